"""ament_python package ``fluorosam_ros``; also installs ``engine``, ``training`` and ``fluorosam_common``
(the bottom layer they all share).

Under ROS 2 (colcon) the console scripts land in ``lib/fluorosam_ros`` so that
``ros2 run fluorosam_ros fluorosam_node`` finds them; with plain pip they land on PATH.
"""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "fluorosam_ros"
DEFAULT_MODEL = "models/fluorosam-tiny"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=["fluorosam_common*", "fluorosam_ros*", "engine*", "training*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + PACKAGE]),
        ("share/" + PACKAGE, ["package.xml"]),
        ("share/" + PACKAGE + "/launch", glob("launch/*.launch.py")),
        ("share/" + PACKAGE + "/config", glob("config/*.yaml")),
        ("share/" + PACKAGE + "/config/bodies", glob("config/bodies/*.yaml")),
        # The default model's weights and record only (not its eval/ reports): colcon copies files, not folders.
        ("share/" + PACKAGE + "/models/fluorosam-tiny", [DEFAULT_MODEL + "/model.json",
                                                        DEFAULT_MODEL + "/model.safetensors"]),
    ],
    install_requires=["setuptools"],
    package_data={"fluorosam_ros": ["demo_data/*.npz"]},
    zip_safe=False,
    maintainer="FluoroSAM-ROS maintainers",
    maintainer_email="fluorosam-ros@example.org",
    description="Language-promptable X-ray segmentation as a real-time fluoroscopy streaming node.",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "fluorosam = fluorosam_ros.cli:main",
            "fluorosam_node = fluorosam_ros.rclpy_node:main",
            "fluorosam_managed_node = fluorosam_ros.rclpy_node:managed_main",
        ],
    },
)
