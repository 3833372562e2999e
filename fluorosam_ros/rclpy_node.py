"""The node under ROS 2: ``fluorosam_node`` (plain) and ``fluorosam_managed_node`` (lifecycle).

Every field of :class:`fluorosam_ros.params.NodeParams` is declared as a ROS parameter with the same
default, so ``config/fluorosam.yaml`` (``--params-file`` / the launch file) and ``-p name:=value`` work
as usual. Inference runs in the core's worker thread; the rclpy executor only receives and publishes.

The managed node follows the ROS 2 lifecycle for equipment that must not act until told: *configure*
loads the model and warms it up, *activate* starts processing and publishing masks, *deactivate* stops
them and keeps the model, *cleanup* / *shutdown* release it. ``/diagnostics`` carries the state from
configure on. Its ``autostart`` parameter (the launch file sets it) walks configure -> activate itself.

Both exit 0 without a traceback on SIGINT (Ctrl-C, ``ros2 launch`` stopping) and SIGTERM: rclpy's own
signal handling is off and ours only asks the spin loop to end, after which the worker is joined and
the node destroyed in order.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading

from fluorosam_ros.params import NODE_NAME, PARAMETER_NAMES, NodeParams

MANAGED_NODE_EXTRA_PARAMETERS = {"autostart": False}


def read_parameters(node) -> NodeParams:
    """Declare every node parameter with its default (once) and read the values ROS resolved."""
    defaults = NodeParams().as_dict()
    for name in PARAMETER_NAMES:
        if not node.has_parameter(name):
            node.declare_parameter(name, defaults[name])
    return NodeParams(**{name: node.get_parameter(name).value for name in PARAMETER_NAMES})


class _RosLogHandler(logging.Handler):
    """Routes the core's Python log records (``fluorosam_node.*``) to the node's ROS logger (/rosout)."""

    def __init__(self, ros_logger) -> None:
        super().__init__()
        self._ros_logger = ros_logger

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        if record.levelno >= logging.ERROR:
            self._ros_logger.error(text)
        elif record.levelno >= logging.WARNING:
            self._ros_logger.warning(text)
        elif record.levelno >= logging.INFO:
            self._ros_logger.info(text)
        else:
            self._ros_logger.debug(text)


def _route_logs(node) -> None:
    logger = logging.getLogger("fluorosam_node")
    logger.handlers = [handler for handler in logger.handlers if not isinstance(handler, _RosLogHandler)]
    logger.addHandler(_RosLogHandler(node.get_logger()))
    logger.setLevel(logging.INFO)
    logger.propagate = False


class StreamingPipeline:
    """Segmenter + node core + rclpy transport of one node: built on configure, dropped on cleanup."""

    def __init__(self, node, params: NodeParams) -> None:
        from fluorosam_ros.core import NodeCore
        from fluorosam_ros.runner import make_segmenter, warm_up
        from fluorosam_ros.transports.rclpy_transport import RclpyTransport

        self.segmenter = make_segmenter(params)
        warm_up(self.segmenter)
        self.transport = RclpyTransport(node, params)
        self.core = NodeCore(self.segmenter, params, self.transport.publish_output,
                             self.transport.publish_diagnostics)
        self.transport.attach(self.core)

    def close(self) -> None:
        self.core.stop()
        self.transport.destroy()


def _install_stop_handlers(stop: threading.Event) -> None:
    def _request_stop(_signum, _frame) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)


def _spin_until(executor, stop: threading.Event) -> None:
    import rclpy

    while not stop.is_set() and rclpy.ok():
        executor.spin_once(timeout_sec=0.1)


def _init(argv: list[str] | None) -> None:
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    rclpy.init(args=sys.argv if argv is None else argv, signal_handler_options=SignalHandlerOptions.NO)


def _shutdown(node) -> None:
    import rclpy

    node.destroy_node()
    if rclpy.ok():
        rclpy.shutdown()


def main(argv: list[str] | None = None) -> int:
    """``fluorosam_node``: configured and publishing from the start."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    stop = threading.Event()
    _install_stop_handlers(stop)
    _init(argv)
    node = Node(NODE_NAME)
    _route_logs(node)
    pipeline = None
    try:
        params = read_parameters(node)
        try:
            pipeline = StreamingPipeline(node, params)
        except (FileNotFoundError, ValueError) as error:
            node.get_logger().error(f"cannot start: {error}")
            return 2
        pipeline.core.start()
        node.get_logger().info(f"fluorosam node ready: backend={pipeline.segmenter.backend_name} "
                               f"model={pipeline.segmenter.model_dir} image={params.image_topic} "
                               f"prompt={params.prompt_topic}")
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        _spin_until(executor, stop)
        node.get_logger().info("stopping")
        executor.shutdown()
    finally:
        if pipeline is not None:
            pipeline.close()
        _shutdown(node)
    return 0


def make_managed_node(name: str = NODE_NAME, **node_kwargs):
    """A ``rclpy.lifecycle.LifecycleNode`` running the pipeline (module docstring); importable for tests."""
    from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn

    class FluoroSamManagedNode(LifecycleNode):
        def __init__(self) -> None:
            super().__init__(name, **node_kwargs)
            for key, default in MANAGED_NODE_EXTRA_PARAMETERS.items():
                self.declare_parameter(key, default)
            read_parameters(self)  # declared now, so `ros2 param` sees them before configure
            _route_logs(self)
            self.pipeline: StreamingPipeline | None = None

        def on_configure(self, state) -> TransitionCallbackReturn:
            try:
                params = read_parameters(self)
                self.pipeline = StreamingPipeline(self, params)
            except (FileNotFoundError, ValueError) as error:
                self.get_logger().error(f"configure failed: {error}")
                return TransitionCallbackReturn.FAILURE
            self.pipeline.core.state = "inactive"
            self.pipeline.core.start()
            self.get_logger().info(f"configured: backend={self.pipeline.segmenter.backend_name}")
            return TransitionCallbackReturn.SUCCESS

        def on_activate(self, state) -> TransitionCallbackReturn:
            self.pipeline.core.state = "active"
            self.get_logger().info("active: processing frames")
            return TransitionCallbackReturn.SUCCESS

        def on_deactivate(self, state) -> TransitionCallbackReturn:
            self.pipeline.core.state = "inactive"
            self.pipeline.core.wait_idle(timeout=10.0)
            self.get_logger().info("inactive: frames are ignored, the model stays loaded")
            return TransitionCallbackReturn.SUCCESS

        def on_cleanup(self, state) -> TransitionCallbackReturn:
            self._release()
            return TransitionCallbackReturn.SUCCESS

        def on_shutdown(self, state) -> TransitionCallbackReturn:
            self._release()
            return TransitionCallbackReturn.SUCCESS

        def on_error(self, state) -> TransitionCallbackReturn:
            self._release()
            return TransitionCallbackReturn.SUCCESS

        def _release(self) -> None:
            if self.pipeline is not None:
                self.pipeline.close()
                self.pipeline = None

    return FluoroSamManagedNode()


def managed_main(argv: list[str] | None = None) -> int:
    """``fluorosam_managed_node``: unconfigured until told (or ``autostart:=true``), shut down on exit."""
    from rclpy.executors import SingleThreadedExecutor

    stop = threading.Event()
    _install_stop_handlers(stop)
    _init(argv)
    node = make_managed_node()
    try:
        if node.get_parameter("autostart").value:
            from rclpy.lifecycle import TransitionCallbackReturn

            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                node.trigger_activate()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        _spin_until(executor, stop)
        node.get_logger().info("stopping")
        executor.shutdown()
        node.trigger_shutdown()
    finally:
        node._release()
        _shutdown(node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
