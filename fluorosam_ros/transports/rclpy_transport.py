"""rclpy transport: the production path under ROS 2 (``ros2 run`` / ``ros2 launch``).

Thin on purpose: ROS messages are converted to :mod:`fluorosam_ros.messages` and back, everything
else is the shared node core. Images are converted without cv_bridge (its 16-bit byte-order and
row-padding handling is what :func:`fluorosam_ros.messages.image_to_numpy` validates instead).
QoS: images sensor-data style (best effort by default, depth ``image_qos_depth``), prompts reliable +
transient local (a late-starting node still gets the last prompt), outputs reliable.
Tested under real rclpy (ROS 2 Jazzy from PyPI) in CI: test/test_node_rclpy.py.
"""
from __future__ import annotations

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import String
from vision_msgs.msg import BoundingBox2D, Detection2D, Detection2DArray, ObjectHypothesisWithPose

from fluorosam_ros.core import Detection, Diagnostics, FrameOutput, NodeCore
from fluorosam_ros.messages import Header, ImageMsg
from fluorosam_ros.params import NodeParams


def image_from_ros(msg: Image) -> ImageMsg:
    stamp = msg.header.stamp
    return ImageMsg(Header(stamp.sec, stamp.nanosec, msg.header.frame_id), msg.height, msg.width, msg.encoding,
                    msg.is_bigendian, msg.step, memoryview(msg.data))


def image_to_ros(msg: ImageMsg) -> Image:
    out = Image()
    out.header.stamp.sec, out.header.stamp.nanosec = int(msg.header.stamp_sec), int(msg.header.stamp_nanosec)
    out.header.frame_id = msg.header.frame_id
    out.height, out.width, out.encoding = msg.height, msg.width, msg.encoding
    out.is_bigendian, out.step, out.data = int(msg.is_bigendian), msg.step, bytes(msg.data)
    return out


def _detection(header, d: Detection) -> Detection2D:
    """Mapping documented in :mod:`fluorosam_ros.ros_types`."""
    det = Detection2D()
    det.header = header
    det.id = f"{d.label}:{d.reason}" if d.refused else str(d.label)
    hypothesis = ObjectHypothesisWithPose()
    hypothesis.hypothesis.class_id, hypothesis.hypothesis.score = d.prompt, float(d.score)
    cx, cy = d.centroid if d.centroid is not None else (float("nan"), float("nan"))
    position = hypothesis.pose.pose.position
    position.x, position.y, position.z = float(cx), float(cy), float(d.area)
    det.results = [hypothesis]
    if d.tip is not None:
        tip = ObjectHypothesisWithPose()
        tip.hypothesis.class_id, tip.hypothesis.score = "tip", float(d.score)
        tip.pose.pose.position.x, tip.pose.pose.position.y = float(d.tip[0]), float(d.tip[1])
        det.results.append(tip)
    bbox = BoundingBox2D()
    if d.bbox is not None:
        x0, y0, x1, y1 = d.bbox
        bbox.center.position.x, bbox.center.position.y = (x0 + x1) / 2.0, (y0 + y1) / 2.0
        bbox.size_x, bbox.size_y = float(x1 - x0 + 1), float(y1 - y0 + 1)
    det.bbox = bbox
    return det


class RclpyTransport:
    """Subscriptions and publishers on an rclpy Node, wired to a NodeCore."""

    def __init__(self, node: Node, params: NodeParams) -> None:
        self.node, self.params = node, params
        image_reliability = (ReliabilityPolicy.BEST_EFFORT if params.image_qos_reliability == "best_effort"
                             else ReliabilityPolicy.RELIABLE)
        image_qos = QoSProfile(depth=params.image_qos_depth, history=HistoryPolicy.KEEP_LAST,
                               reliability=image_reliability, durability=DurabilityPolicy.VOLATILE)
        prompt_qos = QoSProfile(depth=params.prompt_qos_depth, history=HistoryPolicy.KEEP_LAST,
                                reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        out_qos = QoSProfile(depth=params.output_qos_depth, history=HistoryPolicy.KEEP_LAST,
                             reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
        self._qos = (image_qos, prompt_qos)
        self.subscriptions: list = []
        self.mask_pub = node.create_publisher(Image, params.mask_topic, out_qos)
        self.overlay_pub = node.create_publisher(Image, params.overlay_topic, out_qos)
        self.detections_pub = node.create_publisher(Detection2DArray, params.detections_topic, out_qos)
        self.results_pub = node.create_publisher(String, params.results_topic, out_qos)
        self.diagnostics_pub = node.create_publisher(DiagnosticArray, params.diagnostics_topic, out_qos)

    def attach(self, core: NodeCore) -> None:
        image_qos, prompt_qos = self._qos
        self.subscriptions = [
            self.node.create_subscription(Image, self.params.image_topic,
                                          lambda msg: core.submit_frame(image_from_ros(msg)), image_qos),
            self.node.create_subscription(String, self.params.prompt_topic,
                                          lambda msg: core.set_prompts(msg.data), prompt_qos)]

    def destroy(self) -> None:
        """Remove this transport's endpoints from the node (a managed node's cleanup)."""
        for subscription in self.subscriptions:
            self.node.destroy_subscription(subscription)
        for publisher in (self.mask_pub, self.overlay_pub, self.detections_pub, self.results_pub,
                          self.diagnostics_pub):
            self.node.destroy_publisher(publisher)
        self.subscriptions = []

    def publish_output(self, output: FrameOutput) -> None:
        mask = image_to_ros(output.mask)
        self.mask_pub.publish(mask)
        array = Detection2DArray()
        array.header = mask.header
        array.detections = [_detection(mask.header, d) for d in output.detections]
        self.detections_pub.publish(array)
        self.results_pub.publish(String(data=output.results_json()))
        if output.overlay is not None:
            self.overlay_pub.publish(image_to_ros(output.overlay))

    def publish_diagnostics(self, diagnostics: Diagnostics) -> None:
        array = DiagnosticArray()
        array.header.stamp = self.node.get_clock().now().to_msg()
        status = DiagnosticStatus(level=bytes([diagnostics.level]), name=self.node.get_fully_qualified_name(),
                                  message=diagnostics.message, hardware_id=diagnostics.hardware_id,
                                  values=[KeyValue(key=k, value=v) for k, v in diagnostics.values.items()])
        array.status = [status]
        self.diagnostics_pub.publish(array)
