"""``ros2 launch fluorosam_ros fluorosam.launch.py [managed:=true] [params_file:=...] [namespace:=...] [image:=...]``

Starts the node with the ROS-format parameter file (default: the installed config/fluorosam.yaml) in an
optional namespace, with the input and output topics remappable as launch arguments (defaults are the
node's own names, i.e. no remapping). ``managed:=true`` starts the lifecycle node instead and brings it up
to active (its ``autostart`` parameter; ``autostart:=false`` leaves it unconfigured for a lifecycle
manager). Ctrl-C stops either cleanly (exit 0).
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition, UnlessCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription

# launch argument -> topic name the node uses by default (config/fluorosam.yaml)
REMAPPABLE = {
    "image": "/carm/image",
    "prompt": "/fluorosam/prompt",
    "mask": "/fluorosam/mask",
    "detections": "/fluorosam/detections",
    "results": "/fluorosam/results",
    "overlay": "/fluorosam/overlay",
    "diagnostics": "/diagnostics",
}


def _node(executable: str, condition, extra_parameters: list) -> Node:
    return Node(
        package="fluorosam_ros",
        executable=executable,
        name="fluorosam_node",
        namespace=LaunchConfiguration("namespace"),
        parameters=[LaunchConfiguration("params_file")] + extra_parameters,
        remappings=[(topic, LaunchConfiguration(name)) for name, topic in REMAPPABLE.items()],
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
        output="screen",
        emulate_tty=True,
        condition=condition,
    )


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory("fluorosam_ros"), "config", "fluorosam.yaml")
    arguments = [
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="ROS-format parameter YAML for fluorosam_node"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
        DeclareLaunchArgument("log_level", default_value="info"),
        DeclareLaunchArgument("managed", default_value="false",
                              description="true: the lifecycle node (fluorosam_managed_node)"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="managed only: configure and activate at start"),
    ]
    arguments += [DeclareLaunchArgument(name, default_value=topic, description=f"remap {topic}")
                  for name, topic in REMAPPABLE.items()]
    managed = LaunchConfiguration("managed")
    plain = _node("fluorosam_node", UnlessCondition(managed), [])
    lifecycle = _node("fluorosam_managed_node", IfCondition(managed),
                      [{"autostart": LaunchConfiguration("autostart")}])
    return LaunchDescription(arguments + [plain, lifecycle])
