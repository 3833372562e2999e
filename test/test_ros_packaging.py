"""The package as an OR engineer builds it: ``colcon build`` of the repository, then the installed
``fluorosam_node`` with its DEFAULT parameters (bundled model and config found through the ament index)
serves masks to a separate rclpy client and exits 0 on SIGINT; ``colcon test`` passes; package.xml names
every run dependency. Needs colcon and ROS 2 (CI: the Jazzy wheels); skips without them, fails under
FLUOROSAM_REQUIRE_ROS=1.
"""
import os
import shutil
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from ros_support import NodeProcess, RosClient, mono16_frame, next_domain, require_ros, ros_env

ROOT = Path(__file__).resolve().parent.parent
# rosdep keys of what the node imports at run time (python3-* for PyPI-only Python packages have keys too).
RUN_DEPENDENCIES = {"rclpy", "rcl_interfaces", "lifecycle_msgs", "sensor_msgs", "std_msgs", "vision_msgs",
                    "diagnostic_msgs", "ament_index_python", "python3-numpy", "python3-yaml"}


def test_package_xml_lists_the_run_dependencies():
    root = ET.parse(ROOT / "package.xml").getroot()
    depends = {e.text for e in root if e.tag in ("exec_depend", "depend")}
    assert RUN_DEPENDENCIES <= depends, RUN_DEPENDENCIES - depends


def _colcon() -> str:
    colcon = Path(sys.executable).parent / "colcon"
    if colcon.exists():
        return str(colcon)
    if shutil.which("colcon"):
        return shutil.which("colcon")
    if os.environ.get("FLUOROSAM_REQUIRE_ROS") == "1":
        pytest.fail("FLUOROSAM_REQUIRE_ROS=1 but colcon is not installed")
    pytest.skip("colcon is not installed here")


def _workspace_env(install: Path, domain: int) -> dict:
    """What ``source install/setup.bash`` adds for this package, on top of the current environment."""
    prefix = install / "fluorosam_ros"
    env = ros_env(domain)
    env["AMENT_PREFIX_PATH"] = os.pathsep.join(filter(None, [str(prefix), env.get("AMENT_PREFIX_PATH")]))
    site = next((prefix / "lib").glob("python3*/site-packages"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env.pop("FLUOROSAM_HOME", None)
    return env


@pytest.fixture(scope="module")
def colcon_workspace(tmp_path_factory):
    require_ros()
    colcon = _colcon()
    ws = tmp_path_factory.mktemp("colcon_ws")
    (ws / "src").mkdir()
    (ws / "src" / "fluorosam_ros").symlink_to(ROOT)
    listed = subprocess.run([colcon, "list", "--names-only"], cwd=ws, capture_output=True, text=True, check=True)
    assert listed.stdout.split() == ["fluorosam_ros"], listed.stdout  # CI's vision_msgs is not picked up
    build = subprocess.run([colcon, "build", "--packages-select", "fluorosam_ros",
                            "--event-handlers", "console_direct+"], cwd=ws, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    return ws


def test_colcon_install_holds_exactly_the_data_files(colcon_workspace):
    share = colcon_workspace / "install" / "fluorosam_ros" / "share" / "fluorosam_ros"
    assert sorted(p.name for p in (share / "models" / "fluorosam-tiny").iterdir()) == ["model.json",
                                                                                       "model.safetensors"]
    assert (share / "config" / "fluorosam.yaml").exists() and (share / "launch" / "fluorosam.launch.py").exists()
    index = colcon_workspace / "install" / "fluorosam_ros" / "share" / "ament_index" / "resource_index"
    assert (index / "packages" / "fluorosam_ros").exists()
    lib = colcon_workspace / "install" / "fluorosam_ros" / "lib" / "fluorosam_ros"
    assert {"fluorosam_node", "fluorosam_managed_node"} <= {p.name for p in lib.iterdir()}


def test_installed_node_with_default_parameters_serves_masks(colcon_workspace, tmp_path):
    """No arguments at all: the bundled default model and config come from share/fluorosam_ros."""
    domain = next_domain()
    install = colcon_workspace / "install"
    env = _workspace_env(install, domain)
    client = RosClient(domain)
    node = NodeProcess([str(install / "fluorosam_ros" / "lib" / "fluorosam_ros" / "fluorosam_node")], env,
                       tmp_path / "node.log")
    try:
        client.prompt("left lung")
        node.wait_for_log("fluorosam node ready")
        assert str(install / "fluorosam_ros" / "share" / "fluorosam_ros" / "models") in node.text()
        frame = mono16_frame(256, 256)
        for sec in range(1, 30):
            mask = client.send_until_mask(client.image(frame, sec=sec))
            detections = client.wait(lambda sec=sec: client.detections_for(sec), 5)
            if detections and detections.detections:
                break
        assert (mask.height, mask.width) == (256, 256)
        assert detections.detections[0].results[0].hypothesis.class_id == "left lung"
    finally:
        client.close()
        code = node.stop(signal.SIGINT)
    assert code == 0 and "Traceback" not in node.text(), node.text()


def test_colcon_test_passes(colcon_workspace):
    """``colcon test`` + ``colcon test-result`` on the package (here: its packaging tests, to keep CI short;
    a developer's plain ``colcon test`` runs the whole suite)."""
    colcon = _colcon()
    run = subprocess.run([colcon, "test", "--packages-select", "fluorosam_ros", "--pytest-args",
                          "test/test_ros_packaging.py::test_package_xml_lists_the_run_dependencies",
                          "test/test_node_rclpy.py::test_launch_file_parses_and_remaps_every_default_topic"],
                         cwd=colcon_workspace, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    result = subprocess.run([colcon, "test-result", "--verbose"], cwd=colcon_workspace, capture_output=True,
                            text=True)
    assert result.returncode == 0 and "0 errors, 0 failures" in result.stdout, result.stdout + result.stderr
