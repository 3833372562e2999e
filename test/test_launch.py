"""``ros2 launch fluorosam_ros fluorosam.launch.py`` itself, plain and managed, through launch's own
LaunchService: the node comes up (managed: to active), an rclpy client gets masks, and shutting the launch
down (what Ctrl-C does) ends the node with exit code 0.

launch / launch_ros are not on PyPI, so CI cannot have them: these skip there with that reason (even under
FLUOROSAM_REQUIRE_ROS=1). Run them where a ROS distro (or hand-installed launch packages) is present, after
``colcon build`` and ``source install/setup.bash``. Not yet run on a machine with launch installed (2026-12-06).
"""
import asyncio
import threading

import pytest
from ros_support import RosClient, mono16_frame, next_domain, require_ros

from fluorosam_ros.testing import save_random_model, write_params

LAUNCH_REASON = "launch / launch_ros are not installed (not on PyPI; a ROS distro has them)"


@pytest.mark.parametrize("managed", ["false", "true"])
def test_ros2_launch_serves_masks_and_stops_cleanly(tmp_path, monkeypatch, managed):
    require_ros()
    launch = pytest.importorskip("launch", reason=LAUNCH_REASON)
    pytest.importorskip("launch_ros", reason=LAUNCH_REASON)
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    from launch.actions import IncludeLaunchDescription, RegisterEventHandler
    from launch.event_handlers import OnProcessExit
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    try:
        share = get_package_share_directory("fluorosam_ros")
    except PackageNotFoundError:
        pytest.skip("fluorosam_ros is not colcon-installed in this environment (source install/setup.bash)")
    domain = next_domain()
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    model = save_random_model(tmp_path / "model")
    params_file = write_params(tmp_path / "params.yaml", model_dir=str(model), backend="torch", threads=1,
                               min_score=0.0, publish_overlay=False)
    exits = []
    description = launch.LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(f"{share}/launch/fluorosam.launch.py"),
                                 launch_arguments={"params_file": str(params_file), "managed": managed}.items()),
        RegisterEventHandler(OnProcessExit(on_exit=lambda event, _context: exits.append(event.returncode))),
    ])
    service = launch.LaunchService(noninteractive=True)
    service.include_launch_description(description)
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=lambda: loop.run_until_complete(service.run_async()), daemon=True)
    runner.start()
    client = RosClient(domain)
    try:
        client.prompt("left lung")
        client.send_until_mask(client.image(mono16_frame(), sec=51), timeout_s=180)
    finally:
        client.close()
        asyncio.run_coroutine_threadsafe(service.shutdown(), loop).result(timeout=30)  # SIGINT to the node
        runner.join(timeout=60)
    assert exits == [0], exits
