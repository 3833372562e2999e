"""The node under real ROS 2 (rclpy over Fast DDS; in CI the Jazzy wheels from PyPI): the installed
``fluorosam_node`` and ``fluorosam_managed_node`` as separate processes, an rclpy client as the C-arm and
the robot. Each test on its own ROS_DOMAIN_ID with LOCALHOST discovery.

Without ROS 2 these skip with that reason; with FLUOROSAM_REQUIRE_ROS=1 (CI) they fail instead.
"""
import ast
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from ros_support import NodeProcess, RosClient, executable, mono16_frame, next_domain, require_ros, ros_env

from fluorosam_common.paths import config_path
from fluorosam_ros.params import load_params
from fluorosam_ros.ros_types import VISION_MSGS
from fluorosam_ros.testing import save_random_model, write_params

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch" / "fluorosam.launch.py"
VISION_MSGS_PACKAGE = ROOT / "ci" / "ros" / "vision_msgs"


# ------------------------------------------------------------------------------------- everywhere
def test_launch_file_parses_and_remaps_every_default_topic():
    """The launch file is valid Python and its topics match the parameter defaults."""
    tree = ast.parse(LAUNCH.read_text())
    remaps = next(node for node in ast.walk(tree) if isinstance(node, ast.Assign)
                  and getattr(node.targets[0], "id", "") == "REMAPPABLE")
    topics = ast.literal_eval(remaps.value)
    params = load_params(config_path("fluorosam.yaml"))
    assert set(topics.values()) == {params.image_topic, params.prompt_topic, params.mask_topic,
                                    params.detections_topic, params.results_topic, params.overlay_topic,
                                    params.diagnostics_topic}


def _fields(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_vision_msgs_has_the_definitions_the_node_serialises():
    """CI's vision_msgs stand-in and ros_types (replay, DDS transport, type hashes) define the same fields."""
    for name, text in VISION_MSGS.items():
        msg_file = VISION_MSGS_PACKAGE / "msg" / (name.rsplit("/", 1)[1] + ".msg")
        assert _fields(msg_file.read_text()) == _fields(text), name
    assert (ROOT / "ci" / "ros" / "COLCON_IGNORE").exists()  # a user's colcon build must not pick it up


# ------------------------------------------------------------------------------------ under rclpy
@pytest.fixture(scope="module")
def mini_model(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("rclpy_model") / "model")


def test_rclpy_image_conversion_keeps_byte_order_and_row_padding():
    require_ros()
    from sensor_msgs.msg import Image

    from fluorosam_ros.messages import image_to_numpy
    from fluorosam_ros.transports.rclpy_transport import image_from_ros

    pixels = (np.arange(6 * 5).reshape(6, 5) * 1000).astype(">u2")
    row = pixels.tobytes()
    padded = b"".join(row[r * 10:(r + 1) * 10] + b"\xff\xff" for r in range(6))  # step 12 > 10 bytes
    msg = Image(height=6, width=5, encoding="mono16", is_bigendian=1, step=12, data=padded)
    assert np.array_equal(image_to_numpy(image_from_ros(msg)), pixels.astype(np.uint16))
    floats = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    msg = Image(height=3, width=4, encoding="32FC1", is_bigendian=0, step=16, data=floats.tobytes())
    assert np.array_equal(image_to_numpy(image_from_ros(msg)), floats)


def test_cv_bridge_parity():
    """Where a ROS distro's cv_bridge is importable, the node's conversion agrees with it."""
    require_ros()
    cv_bridge = pytest.importorskip("cv_bridge", reason="no ROS distro cv_bridge here (PyPI's is ROS 1 era)")
    from fluorosam_ros.messages import image_to_numpy
    from fluorosam_ros.transports.rclpy_transport import image_from_ros

    bridge = cv_bridge.CvBridge()
    for array, encoding in ((np.arange(20, dtype=np.uint8).reshape(4, 5), "mono8"),
                            ((np.arange(20) * 3000).astype(np.uint16).reshape(4, 5), "mono16"),
                            (np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5), "32FC1"),
                            (np.arange(60, dtype=np.uint8).reshape(4, 5, 3), "rgb8"),
                            (np.arange(60, dtype=np.uint8).reshape(4, 5, 3), "bgr8")):
        msg = bridge.cv2_to_imgmsg(array, encoding)
        assert np.array_equal(image_to_numpy(image_from_ros(msg)), bridge.imgmsg_to_cv2(msg)), encoding


def _no_traceback(node: NodeProcess) -> None:
    text = node.text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text


def _frames_until(client, stamps, prompts: list[str]):
    """Send frames (one stamp each) until the detections answer exactly ``prompts``: the node applies a
    prompt from the next frame on, and a late joiner may see frames before the latched prompt."""
    for sec in stamps:
        mask = client.send_until_mask(client.image(mono16_frame(), sec=sec))
        detections = client.wait(lambda sec=sec: client.detections_for(sec), 5)
        if detections and [d.results[0].hypothesis.class_id for d in detections.detections] == prompts:
            return mask, detections
    raise AssertionError(f"no detections for {prompts} in frames {stamps}")


def test_installed_node_serves_a_late_joining_rclpy_client_and_exits_cleanly(tmp_path, mini_model):
    """fluorosam_node from the pip install, parameters from a YAML and from -p: a prompt published before
    the node starts (transient local), best-effort mono8/mono16/32FC1 frames, a prompt change, a refused
    prompt, a malformed frame reported and the next good frame processed; SIGINT exits 0."""
    require_ros("rclpy.parameter_client")
    from rcl_interfaces.msg import ParameterType
    from rclpy.parameter_client import AsyncParameterClient

    domain = next_domain()
    params_file = write_params(tmp_path / "params.yaml", backend="torch", threads=1, diagnostics_period_s=0.4,
                               publish_overlay=False)
    client = RosClient(domain)
    node, code = None, None
    try:
        client.prompt("left lung")  # before the node exists: it must still get it
        node = NodeProcess([executable("fluorosam_node"), "--ros-args", "--params-file", str(params_file),
                            "-p", f"model_dir:={mini_model}", "-p", "min_score:=0.0"],
                           ros_env(domain), tmp_path / "node.log")
        node.wait_for_log("fluorosam node ready")

        mask, detections = _frames_until(client, range(100, 160), ["left lung"])
        assert (mask.encoding, mask.height, mask.width, mask.header.frame_id) == ("mono8", 48, 40, "carm")
        assert mask.header.stamp.nanosec == 500

        for sec, pixels, encoding in ((12, (mono16_frame() % 256).astype(np.uint8), "mono8"),
                                      (13, mono16_frame().astype(np.float32) / 4096.0, "32FC1")):
            mask = client.send_until_mask(client.image(pixels, sec=sec, encoding=encoding))
            assert (mask.height, mask.width) == (48, 40), encoding

        client.prompt("left lung; heart")  # mid-stream change: two labels from the next frames on
        _frames_until(client, range(14, 40), ["left lung", "heart"])

        bad = client.image(mono16_frame(), sec=45)
        bad.data = bytes(bad.data[:100])  # shorter than step * height
        before = int(client.last_diagnostics().get("bad_frames", "0"))
        client.image_pub.publish(bad)
        report = client.wait(lambda: (d := client.last_diagnostics()) and int(d["bad_frames"]) > before and d, 15)
        assert report and "rejected" in report["last_error"] and "step * height" in report["last_error"]
        client.send_until_mask(client.image(mono16_frame(), sec=46))
        diagnostics = client.last_diagnostics()
        assert diagnostics["backend"] == "torch" and diagnostics["state"] == "active"

        parameters = AsyncParameterClient(client.node, "fluorosam_node")
        assert parameters.wait_for_services(timeout_sec=10)
        future = parameters.get_parameters(["model_dir", "diagnostics_period_s", "image_qos_reliability"])
        result = client.wait(lambda: future.done() and future.result(), 10)
        values = result.values
        assert values[0].type == ParameterType.PARAMETER_STRING and values[0].string_value == str(mini_model)
        assert values[1].double_value == pytest.approx(0.4) and values[2].string_value == "best_effort"
    finally:
        client.close()
        if node is not None:
            code = node.stop(signal.SIGINT)
    assert code == 0, node.text()
    _no_traceback(node)


def _change_state(client, transition_id: int) -> bool:
    from lifecycle_msgs.srv import ChangeState

    service = client.node.create_client(ChangeState, "/fluorosam_node/change_state")
    assert service.wait_for_service(timeout_sec=20)
    request = ChangeState.Request()
    request.transition.id = transition_id
    future = service.call_async(request)
    assert client.wait(lambda: future.done(), 120), "no answer to change_state"
    client.node.destroy_client(service)
    return future.result().success


def _state(client) -> str:
    from lifecycle_msgs.srv import GetState

    service = client.node.create_client(GetState, "/fluorosam_node/get_state")
    assert service.wait_for_service(timeout_sec=20)
    future = service.call_async(GetState.Request())
    assert client.wait(lambda: future.done(), 20)
    client.node.destroy_client(service)
    return future.result().current_state.label


def _no_mask_for(client, sec: int, seconds: float = 2.0) -> bool:
    msg = client.image(mono16_frame(), sec=sec)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        client.image_pub.publish(msg)
        time.sleep(0.2)
    return client.mask_for(sec) is None


def test_managed_node_lifecycle_transitions(tmp_path, mini_model):
    """configure loads (no masks while inactive, diagnostics say so), activate publishes, deactivate stops
    and keeps the model, activate again works without reloading, cleanup releases, SIGTERM exits 0."""
    require_ros()
    from lifecycle_msgs.msg import Transition

    domain = next_domain()
    params_file = write_params(tmp_path / "params.yaml", backend="torch", threads=1, diagnostics_period_s=0.3,
                               publish_overlay=False, model_dir=str(mini_model), min_score=0.0,
                               initial_prompt="left lung")
    client = RosClient(domain)
    node = NodeProcess([executable("fluorosam_managed_node"), "--ros-args", "--params-file", str(params_file)],
                       ros_env(domain), tmp_path / "node.log")
    try:
        assert client.wait(lambda: _state(client) == "unconfigured", 120)
        assert _change_state(client, Transition.TRANSITION_CONFIGURE)
        assert _state(client) == "inactive"
        assert client.wait(lambda: client.last_diagnostics().get("state") == "inactive", 10)
        assert _no_mask_for(client, 21)
        assert _change_state(client, Transition.TRANSITION_ACTIVATE)
        client.send_until_mask(client.image(mono16_frame(), sec=22))
        assert _change_state(client, Transition.TRANSITION_DEACTIVATE)
        assert _no_mask_for(client, 23)
        assert _change_state(client, Transition.TRANSITION_ACTIVATE)
        client.send_until_mask(client.image(mono16_frame(), sec=24))
        assert node.text().count("configured: backend=") == 1  # the model was loaded once
        assert _change_state(client, Transition.TRANSITION_DEACTIVATE)
        assert _change_state(client, Transition.TRANSITION_CLEANUP)
        assert _state(client) == "unconfigured"
    finally:
        client.close()
        code = node.stop(signal.SIGTERM)
    assert code == 0, node.text()
    _no_traceback(node)


def test_managed_node_autostart_comes_up_active(tmp_path, mini_model):
    """What the launch file does with managed:=true: autostart walks configure -> activate; refusals carry
    their reason in the detection id and the mask stays empty; SIGINT exits 0."""
    require_ros()
    domain = next_domain()
    params_file = write_params(tmp_path / "params.yaml", backend="torch", threads=1, publish_overlay=False,
                               model_dir=str(mini_model), min_score=1e9)
    client = RosClient(domain)
    node = NodeProcess([executable("fluorosam_managed_node"), "--ros-args", "--params-file", str(params_file),
                        "-p", "autostart:=true"], ros_env(domain), tmp_path / "node.log")
    try:
        client.prompt("heart")
        node.wait_for_log("active: processing frames")
        mask = client.send_until_mask(client.image(mono16_frame(), sec=31))
        assert not any(mask.data)
        detections = client.wait(lambda: client.detections_for(31), 10)
        assert [d.id for d in detections.detections] == ["1:low_score"]
        assert detections.detections[0].results[0].hypothesis.class_id == "heart"
    finally:
        client.close()
        code = node.stop(signal.SIGINT)
    assert code == 0, node.text()
    _no_traceback(node)
    assert re.search(r"configured: backend=torch", node.text())
