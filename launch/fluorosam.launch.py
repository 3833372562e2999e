"""``ros2 launch fluorosam_ros fluorosam.launch.py [params_file:=...] [namespace:=...] [image:=...] ...``

Starts ``fluorosam_node`` with the ROS-format parameter file (default: the installed
config/fluorosam.yaml) in an optional namespace, with the input and output topics remappable as
launch arguments (defaults are the node's own names, i.e. no remapping).
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

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


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory("fluorosam_ros"), "config", "fluorosam.yaml")
    arguments = [
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="ROS-format parameter YAML for fluorosam_node"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
        DeclareLaunchArgument("log_level", default_value="info"),
    ]
    arguments += [DeclareLaunchArgument(name, default_value=topic, description=f"remap {topic}")
                  for name, topic in REMAPPABLE.items()]
    node = Node(
        package="fluorosam_ros",
        executable="fluorosam_node",
        name="fluorosam_node",
        namespace=LaunchConfiguration("namespace"),
        parameters=[LaunchConfiguration("params_file")],
        remappings=[(topic, LaunchConfiguration(name)) for name, topic in REMAPPABLE.items()],
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
        output="screen",
        emulate_tty=True,
    )
    return LaunchDescription(arguments + [node])
