"""FluoroSAM-ROS: language-promptable X-ray segmentation as a real-time streaming node."""
__version__ = "0.1.0"
