"""ROS 2 message types without ROS: a rosbags typestore (Jazzy + vision_msgs) and conversions.

Used by replay (rosbag2 CDR records) and as the reference the DDS transport's bytes are checked against.
How the node's results map onto ``vision_msgs/Detection2DArray`` (one Detection2D per prompt, in
prompt order, header = the input frame's):

* ``id``: the prompt's label in the mask ("1", "2", ...); refused prompts: "<label>:<reason>" (e.g. "2:low_score")
* ``results[0].hypothesis``: ``class_id`` = the prompt text, ``score`` = predicted IoU
* ``results[0].pose.pose.position``: centroid x, y in pixels (z = mask area in pixels); NaN x/y when refused
* ``bbox``: centre and size in pixels of the inclusive box; all zeros when refused
* ``results[1]``, only for a tool prompt with a mask: ``class_id`` "tip", the same score, and
  ``pose.pose.position`` x, y = the device's tip in pixels (z = 0; the rule: fluorosam_common/thin.py)
Every field of every result is also on the results topic as JSON (std_msgs/String).
"""
from __future__ import annotations

import functools
import time

import numpy as np
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from fluorosam_ros.core import Detection, Diagnostics, FrameOutput
from fluorosam_ros.messages import Header, ImageMsg

IMAGE = "sensor_msgs/msg/Image"
STRING = "std_msgs/msg/String"
DETECTIONS = "vision_msgs/msg/Detection2DArray"
DIAGNOSTICS = "diagnostic_msgs/msg/DiagnosticArray"

# vision_msgs 4.x (Humble and later) definitions.
VISION_MSGS = {
    "vision_msgs/msg/Point2D": "float64 x\nfloat64 y\n",
    "vision_msgs/msg/Pose2D": "vision_msgs/Point2D position\nfloat64 theta\n",
    "vision_msgs/msg/BoundingBox2D": "vision_msgs/Pose2D center\nfloat64 size_x\nfloat64 size_y\n",
    "vision_msgs/msg/ObjectHypothesis": "string class_id\nfloat64 score\n",
    "vision_msgs/msg/ObjectHypothesisWithPose":
        "vision_msgs/ObjectHypothesis hypothesis\ngeometry_msgs/PoseWithCovariance pose\n",
    "vision_msgs/msg/Detection2D":
        "std_msgs/Header header\nvision_msgs/ObjectHypothesisWithPose[] results\nvision_msgs/BoundingBox2D bbox\n"
        "string id\n",
    "vision_msgs/msg/Detection2DArray": "std_msgs/Header header\nvision_msgs/Detection2D[] detections\n",
}


@functools.lru_cache(maxsize=1)
def typestore():
    """Jazzy's standard messages plus vision_msgs."""
    store = get_typestore(Stores.ROS2_JAZZY)
    types = {}
    for name, text in VISION_MSGS.items():
        types.update(get_types_from_msg(text, name))
    store.register(types)
    return store


def _t(name: str):
    return typestore().types[name]


def ros_header(header: Header):
    return _t("std_msgs/msg/Header")(stamp=_t("builtin_interfaces/msg/Time")(sec=int(header.stamp_sec),
                                                                            nanosec=int(header.stamp_nanosec)),
                                     frame_id=header.frame_id)


def image_to_ros(msg: ImageMsg):
    return _t(IMAGE)(header=ros_header(msg.header), height=msg.height, width=msg.width, encoding=msg.encoding,
                     is_bigendian=int(msg.is_bigendian), step=msg.step,
                     data=np.frombuffer(msg.data, np.uint8))


def image_from_ros(ros) -> ImageMsg:
    return ImageMsg(Header(int(ros.header.stamp.sec), int(ros.header.stamp.nanosec), str(ros.header.frame_id)),
                    int(ros.height), int(ros.width), str(ros.encoding), int(ros.is_bigendian), int(ros.step),
                    np.asarray(ros.data, np.uint8).tobytes() if not isinstance(ros.data, bytes) else ros.data)


def string_to_ros(text: str):
    return _t(STRING)(data=text)


def _detection(header, d: Detection):
    t = typestore().types
    nan = float("nan")
    cx, cy = d.centroid if d.centroid is not None else (nan, nan)
    pose = t["geometry_msgs/msg/PoseWithCovariance"](
        pose=t["geometry_msgs/msg/Pose"](position=t["geometry_msgs/msg/Point"](x=cx, y=cy, z=float(d.area)),
                                         orientation=t["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0)),
        covariance=np.zeros(36, np.float64))
    hypothesis = t["vision_msgs/msg/ObjectHypothesisWithPose"](
        hypothesis=t["vision_msgs/msg/ObjectHypothesis"](class_id=d.prompt, score=float(d.score)), pose=pose)
    if d.bbox is not None:
        x0, y0, x1, y1 = d.bbox
        centre, size = ((x0 + x1) / 2.0, (y0 + y1) / 2.0), (float(x1 - x0 + 1), float(y1 - y0 + 1))
    else:
        centre, size = (0.0, 0.0), (0.0, 0.0)
    bbox = t["vision_msgs/msg/BoundingBox2D"](
        center=t["vision_msgs/msg/Pose2D"](position=t["vision_msgs/msg/Point2D"](x=centre[0], y=centre[1]), theta=0.0),
        size_x=size[0], size_y=size[1])
    results = [hypothesis]
    if d.tip is not None:
        results.append(t["vision_msgs/msg/ObjectHypothesisWithPose"](
            hypothesis=t["vision_msgs/msg/ObjectHypothesis"](class_id="tip", score=float(d.score)),
            pose=t["geometry_msgs/msg/PoseWithCovariance"](
                pose=t["geometry_msgs/msg/Pose"](position=t["geometry_msgs/msg/Point"](x=d.tip[0], y=d.tip[1], z=0.0),
                                                 orientation=t["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0,
                                                                                              w=1.0)),
                covariance=np.zeros(36, np.float64))))
    return t["vision_msgs/msg/Detection2D"](header=header, results=results, bbox=bbox,
                                           id=f"{d.label}:{d.reason}" if d.refused else str(d.label))


def detections_to_ros(output: FrameOutput):
    header = ros_header(output.header)
    return _t(DETECTIONS)(header=header, detections=[_detection(header, d) for d in output.detections])


def diagnostics_to_ros(diagnostics: Diagnostics, stamp_ns: int | None = None):
    t = typestore().types
    stamp_ns = time.time_ns() if stamp_ns is None else stamp_ns
    status = t["diagnostic_msgs/msg/DiagnosticStatus"](
        level=int(diagnostics.level), name=diagnostics.name, message=diagnostics.message,
        hardware_id=diagnostics.hardware_id,
        values=[t["diagnostic_msgs/msg/KeyValue"](key=k, value=v) for k, v in diagnostics.values.items()])
    return _t(DIAGNOSTICS)(header=ros_header(Header.from_ns(stamp_ns)), status=[status])


def type_hash(typename: str) -> str:
    """REP-2016 type hash (``RIHS01_<sha256>``) that Jazzy's rmw layers put in each endpoint's USER_DATA."""
    return typestore().hash_rihs01(typename)


def serialize(message, typename: str) -> bytes:
    return bytes(typestore().serialize_cdr(message, typename))


def deserialize(raw, typename: str):
    return typestore().deserialize_cdr(raw, typename)
