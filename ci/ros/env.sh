# source ci/ros/env.sh VENV PREFIX: the environment of ROS 2 Jazzy from PyPI (what a distro's setup.bash gives):
# the venv's wheels and PREFIX's vision_msgs on the ament index, loopback-only discovery.
_fluorosam_venv=$(cd "$1" && pwd)
_fluorosam_prefix=$(cd "$2" && pwd)
case $- in *u*) _fluorosam_nounset=1; set +u ;; *) _fluorosam_nounset= ;; esac  # colcon's script needs unset vars
# shellcheck disable=SC1091
source "$_fluorosam_prefix/local_setup.bash"
[ -n "$_fluorosam_nounset" ] && set -u
export AMENT_PREFIX_PATH="$AMENT_PREFIX_PATH:$_fluorosam_venv"
export CMAKE_PREFIX_PATH="$CMAKE_PREFIX_PATH:$_fluorosam_venv"
export PATH="$_fluorosam_venv/bin:$PATH"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
unset _fluorosam_venv _fluorosam_prefix _fluorosam_nounset
