"""Transports of the streaming node: ``zmq``, ``dds`` (ROS 2 wire format without ROS) and ``rclpy``.

Each one converts its wire messages to :mod:`fluorosam_ros.messages`, feeds a
:class:`fluorosam_ros.core.NodeCore`, and publishes its outputs. Modules are imported only when chosen.
"""
