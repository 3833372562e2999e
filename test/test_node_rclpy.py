"""The rclpy node (production path under ROS 2). Needs a ROS 2 install: skipped with that reason otherwise."""
import ast
from pathlib import Path

import numpy as np
import pytest

from fluorosam_ros.params import PARAMETER_NAMES, load_params
from fluorosam_ros.paths import config_path

LAUNCH = Path(__file__).resolve().parent.parent / "launch" / "fluorosam.launch.py"


def test_launch_file_parses_and_remaps_every_default_topic():
    """Runs everywhere: the launch file is valid Python and its topics match the parameter defaults."""
    tree = ast.parse(LAUNCH.read_text())
    remaps = next(node for node in ast.walk(tree) if isinstance(node, ast.Assign)
                  and getattr(node.targets[0], "id", "") == "REMAPPABLE")
    topics = ast.literal_eval(remaps.value)
    params = load_params(config_path("fluorosam.yaml"))
    assert set(topics.values()) == {params.image_topic, params.prompt_topic, params.mask_topic,
                                    params.detections_topic, params.results_topic, params.overlay_topic,
                                    params.diagnostics_topic}


@pytest.mark.rclpy
def test_rclpy_node_round_trip(tmp_path):
    rclpy = pytest.importorskip("rclpy", reason="ROS 2 (rclpy) is not installed here; the rclpy node is untested")
    pytest.importorskip("vision_msgs", reason="ROS 2 vision_msgs is not installed")
    import threading
    import time

    from rclpy.executors import MultiThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from fluorosam_ros.core import NodeCore
    from fluorosam_ros.messages import Header, numpy_to_image
    from fluorosam_ros.rclpy_node import read_parameters
    from fluorosam_ros.runner import make_segmenter
    from fluorosam_ros.testing import save_random_model
    from fluorosam_ros.transports.rclpy_transport import RclpyTransport, image_to_ros

    model = save_random_model(tmp_path / "model")
    rclpy.init()
    try:
        node = Node("fluorosam_node", parameter_overrides=[
            Parameter("model_dir", value=str(model)), Parameter("backend", value="torch")])
        params = read_parameters(node)
        assert all(node.has_parameter(name) for name in PARAMETER_NAMES) and params.backend == "torch"
        transport = RclpyTransport(node, params)
        core = NodeCore(make_segmenter(params), params, transport.publish_output, transport.publish_diagnostics)
        transport.attach(core)
        core.start()
        client = Node("fluorosam_test_client")
        masks = []
        client.create_subscription(Image, params.mask_topic, masks.append, 10)
        prompt_pub = client.create_publisher(String, params.prompt_topic, transport._qos[1])
        image_pub = client.create_publisher(Image, params.image_topic, 10)
        executor = MultiThreadedExecutor()
        executor.add_node(node)
        executor.add_node(client)
        threading.Thread(target=executor.spin, daemon=True).start()
        prompt_pub.publish(String(data="left lung"))
        pixels = (np.arange(48 * 40).reshape(48, 40) % 4096).astype(np.uint16)
        deadline = time.monotonic() + 30
        while not masks and time.monotonic() < deadline:
            image_pub.publish(image_to_ros(numpy_to_image(pixels, header=Header(7, 9, "carm"))))
            time.sleep(0.5)
        assert masks and masks[0].header.stamp.sec == 7 and masks[0].encoding == "mono8"
        core.stop()
        executor.shutdown()
    finally:
        rclpy.shutdown()
