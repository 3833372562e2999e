"""``ros2 run fluorosam_ros fluorosam_node`` (console script ``fluorosam_node``): the node under ROS 2.

Every field of :class:`fluorosam_ros.params.NodeParams` is declared as a ROS parameter with the same
default, so ``config/fluorosam.yaml`` (``--params-file`` / the launch file) and ``-p name:=value`` work
as usual. Inference runs in the core's worker thread; the rclpy executor only receives and publishes.
"""
from __future__ import annotations

import sys

from fluorosam_ros.params import NODE_NAME, PARAMETER_NAMES, NodeParams


def read_parameters(node) -> NodeParams:
    """Declare every node parameter with its default and read the values ROS resolved."""
    defaults = NodeParams().as_dict()
    for name in PARAMETER_NAMES:
        node.declare_parameter(name, defaults[name])
    return NodeParams(**{name: node.get_parameter(name).value for name in PARAMETER_NAMES})


def main(argv: list[str] | None = None) -> int:
    import rclpy
    from rclpy.node import Node

    from fluorosam_ros.core import NodeCore
    from fluorosam_ros.runner import make_segmenter, warm_up
    from fluorosam_ros.transports.rclpy_transport import RclpyTransport

    rclpy.init(args=sys.argv if argv is None else argv)
    node = Node(NODE_NAME)
    try:
        params = read_parameters(node)
        segmenter = make_segmenter(params)
        warm_up(segmenter)
        transport = RclpyTransport(node, params)
        core = NodeCore(segmenter, params, transport.publish_output, transport.publish_diagnostics)
        transport.attach(core)
        core.start()
        node.get_logger().info(f"fluorosam node ready: backend={segmenter.backend_name} image={params.image_topic} "
                               f"prompt={params.prompt_topic}")
        try:
            rclpy.spin(node)
        except KeyboardInterrupt:
            pass
        finally:
            core.stop()
    finally:
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
