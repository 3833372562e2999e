"""The streaming node core: transport-agnostic (it never imports rclpy, DDS or ZeroMQ).

A transport hands frames to :meth:`NodeCore.submit_frame` and prompt strings to
:meth:`NodeCore.set_prompts`, and receives :class:`FrameOutput` and :class:`Diagnostics` through the
two callbacks it passes in. Frames go into a single latest-frame slot read by one inference worker:
when inference falls behind, the older frame in the slot is replaced and counted as dropped, so latency
stays bounded by one inference time instead of growing with a queue. Every processed frame produces
exactly one label mask (all zeros when nothing was found or no prompt is set); a frame that cannot be
used produces no mask, an error in the diagnostics and a log line, and the worker carries on.

Prompt syntax (one string, e.g. from ``/fluorosam/prompt``)::

    left lung; right lung                     two text prompts (label 1 and label 2 in the mask)
    left lung @ 120,88,+1 130,90,-1           text plus points in frame pixels: +1/1 positive, -1/0 negative
    <empty or whitespace>                     clears every prompt

A malformed prompt string is rejected as a whole (the previous prompts stay active) and reported.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from engine.segmenter import Prompt, PromptResult, SegmentResult, label_mask
from fluorosam_common.frames import window
from fluorosam_ros.messages import Header, ImageError, ImageMsg, image_to_numpy, numpy_to_image
from fluorosam_ros.params import NodeParams

log = logging.getLogger("fluorosam_node")

MAX_PROMPTS = 255  # the label mask is mono8
MAX_PROMPT_CHARS = 200
MAX_POINTS = 32
LATENCY_WINDOW = 256
ERROR_HOLD_S = 5.0  # diagnostics stay WARN this long after an error, then return to OK (last_error is kept)
OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels
# Overlay colours per label (RGB), cycled.
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.uint8)


class PromptError(ValueError):
    """A prompt string that does not follow the documented syntax."""


def parse_prompts(text: str) -> list[Prompt]:
    """``"a; b @ x,y,+1 x,y,-1"`` -> prompts; empty text -> no prompts. Raises :class:`PromptError`."""
    if not isinstance(text, str):
        raise PromptError(f"prompt must be a string, got {type(text).__name__}")
    if any(ord(ch) < 32 and ch not in "\t\n\r" for ch in text):
        raise PromptError("prompt contains control characters")
    prompts = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        words, _, points_text = part.partition("@")
        words = " ".join(words.split())
        if not words:
            raise PromptError(f"prompt {part!r} has points but no text")
        if len(words) > MAX_PROMPT_CHARS:
            raise PromptError(f"prompt {words[:40]!r}... is longer than {MAX_PROMPT_CHARS} characters")
        points = []
        for token in points_text.split():
            fields = token.split(",")
            if len(fields) != 3:
                raise PromptError(f"point {token!r} in {part!r} must be x,y,label (e.g. 120,88,+1)")
            try:
                x, y, label = float(fields[0]), float(fields[1]), int(fields[2])
            except ValueError:
                raise PromptError(f"point {token!r} in {part!r} must be numbers x,y,label") from None
            if not (math.isfinite(x) and math.isfinite(y)) or x < 0 or y < 0:
                raise PromptError(f"point {token!r} in {part!r} must have finite, non-negative x and y")
            if label not in (1, 0, -1):
                raise PromptError(f"point label in {token!r} must be +1/1 (positive) or -1/0 (negative)")
            points.append((x, y, 1 if label == 1 else 0))
        if len(points) > MAX_POINTS:
            raise PromptError(f"prompt {words!r} has {len(points)} points; at most {MAX_POINTS}")
        if "@" in part and not points:
            raise PromptError(f"prompt {part!r} has '@' but no points")
        prompts.append(Prompt(words, tuple(points)))
    if len(prompts) > MAX_PROMPTS:
        raise PromptError(f"{len(prompts)} prompts do not fit the mono8 label mask (at most {MAX_PROMPTS})")
    return prompts


@dataclass
class Detection:
    """One prompt's result as published (label = its value in the label mask)."""

    label: int
    prompt: str
    score: float
    refused: bool
    reason: str
    area: int
    bbox: tuple[int, int, int, int] | None  # x0, y0, x1, y1 inclusive, frame pixels
    centroid: tuple[float, float] | None  # x, y
    tip: tuple[float, float] | None = None  # x, y of a device's tip: tool prompts with a mask

    @classmethod
    def from_result(cls, label: int, result: PromptResult) -> Detection:
        return cls(label, result.prompt, float(result.score), bool(result.refused), result.reason, int(result.area),
                   tuple(int(v) for v in result.bbox) if result.bbox is not None else None,
                   tuple(float(v) for v in result.centroid) if result.centroid is not None else None,
                   tuple(float(v) for v in result.tip) if result.tip is not None else None)


@dataclass
class FrameOutput:
    """Everything published for one processed frame, stamped with the input header."""

    header: Header
    mask: ImageMsg  # mono8 label mask
    detections: list[Detection]
    overlay: ImageMsg | None
    latency_ms: float
    embedding_reused: bool

    def results_json(self) -> str:
        return json.dumps({"stamp": [self.header.stamp_sec, self.header.stamp_nanosec],
                           "frame_id": self.header.frame_id, "latency_ms": round(self.latency_ms, 2),
                           "embedding_reused": self.embedding_reused,
                           "detections": [asdict(d) for d in self.detections]})


@dataclass
class Diagnostics:
    level: int
    message: str
    values: dict[str, str] = field(default_factory=dict)
    name: str = "fluorosam_node"
    hardware_id: str = ""


def overlay_image(frame: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    """rgb8 picture of the windowed frame with each label tinted in its palette colour."""
    gray = window(frame) if frame.ndim == 2 else frame.astype(np.float32).mean(axis=2) / 255.0
    rgb = np.repeat((gray * 255.0).astype(np.uint8)[:, :, None], 3, axis=2)
    if labels.any():
        colours = PALETTE[(labels.astype(np.int64) - 1) % len(PALETTE)]
        tinted = (rgb * (1 - alpha) + colours * alpha).astype(np.uint8)
        rgb = np.where(labels[:, :, None] > 0, tinted, rgb)
    return rgb


def _percentile(values, q: float) -> float:
    return float(np.percentile(np.fromiter(values, float), q)) if values else float("nan")


class ThrottledLog:
    """Logs at most one line per ``kind`` every ``period_s``, telling how many of that kind it held back."""

    def __init__(self, logger: logging.Logger, period_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger, self._period_s, self._clock = logger, period_s, clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def error(self, kind: str, text: str, exc_info: bool = False) -> None:
        now = self._clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self._period_s:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            held = self._suppressed.pop(kind, 0)
        self._logger.error("%s%s", text, f" ({held} more '{kind}' suppressed in the last "
                                         f"{now - last:.1f} s)" if held else "", exc_info=exc_info)


class NodeCore:
    """Latest-frame slot, one inference worker, prompt state, outputs and diagnostics (see module docstring)."""

    def __init__(self, segmenter, params: NodeParams, on_output: Callable[[FrameOutput], None],
                 on_diagnostics: Callable[[Diagnostics], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.segmenter = segmenter
        self.params = params
        self._on_output = on_output
        self._on_diagnostics = on_diagnostics
        self._clock = clock
        self._lock = threading.Condition()
        self._slot: tuple[ImageMsg, float] | None = None
        self._busy = False
        self._prompts: list[Prompt] = []
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._timer: threading.Thread | None = None
        self.counts = {"frames_received": 0, "frames_processed": 0, "frames_dropped": 0, "bad_frames": 0,
                       "bad_prompts": 0, "prompt_updates": 0, "processing_errors": 0,
                       "malformed_messages": 0, "frames_ignored_inactive": 0}
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._processed_times: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._last_frame_time: float | None = None
        self._started_at = clock()
        self.last_error = ""
        self._last_error_time: float | None = None
        self._error_log = ThrottledLog(log, clock=clock)
        self.state = "active"  # a managed (lifecycle) node sets "inactive" while it must not act
        if params.initial_prompt:
            self.set_prompts(params.initial_prompt)

    # ----------------------------------------------------------------------------------- inputs
    @property
    def prompts(self) -> list[Prompt]:
        with self._lock:
            return list(self._prompts)

    def set_prompts(self, text: str) -> bool:
        """Replace the active prompts (takes effect on the next frame); False and a reported error if malformed."""
        try:
            prompts = parse_prompts(text)
        except PromptError as error:
            self.counts["bad_prompts"] += 1
            self.report_error(f"prompt rejected: {error}")
            return False
        with self._lock:
            self._prompts = prompts
            self.counts["prompt_updates"] += 1
        log.info("prompts: %s", "; ".join(p.text for p in prompts) or "(cleared)")
        return True

    def submit_frame(self, msg: ImageMsg) -> None:
        """Put ``msg`` in the latest-frame slot for the worker; a frame still waiting there is dropped."""
        now = self._clock()
        with self._lock:
            if self.state != "active":
                self.counts["frames_ignored_inactive"] += 1
                return
            self.counts["frames_received"] += 1
            self._last_frame_time = now
            if self._slot is not None:
                self.counts["frames_dropped"] += 1
            self._slot = (msg, now)
            self._lock.notify_all()

    # ---------------------------------------------------------------------------------- process
    def process(self, msg: ImageMsg, received_at: float | None = None) -> FrameOutput | None:
        """Segment one frame synchronously and publish its outputs; None (and a reported error) if unusable."""
        received_at = self._clock() if received_at is None else received_at
        with self._lock:
            prompts = list(self._prompts)
        try:
            frame = image_to_numpy(msg)
            if frame.ndim == 3:
                raise ImageError(f"{msg.encoding} frames are colour; the node segments grayscale X-ray frames")
            result: SegmentResult = self.segmenter.segment(frame, prompts) if prompts else SegmentResult(
                [], False, {}, tuple(frame.shape[:2]))
            labels = label_mask(result) if result.results else np.zeros(frame.shape[:2], np.uint8)
        except ValueError as error:  # ImageError, FrameError and bad prompts on this frame: the input's fault
            self.counts["bad_frames"] += 1
            self.report_error(f"frame {msg.header.stamp_sec}.{msg.header.stamp_nanosec:09d} rejected: {error}",
                              kind="frame rejected")
            return None
        except Exception as error:  # noqa: BLE001  (the node must outlive any inference failure)
            self.counts["processing_errors"] += 1
            self.report_error(f"inference failed: {type(error).__name__}: {error}", exc_info=True)
            return None
        header = Header(msg.header.stamp_sec, msg.header.stamp_nanosec, msg.header.frame_id)
        overlay = None
        if self.params.publish_overlay:
            overlay = numpy_to_image(overlay_image(frame, labels, self.params.overlay_alpha), "rgb8", header)
        detections = [Detection.from_result(k, r) for k, r in enumerate(result.results, start=1)]
        latency_ms = (self._clock() - received_at) * 1e3
        output = FrameOutput(header, numpy_to_image(labels, "mono8", header), detections, overlay, latency_ms,
                             result.embedding_reused)
        with self._lock:
            self.counts["frames_processed"] += 1
            self._latencies.append(latency_ms)
            self._processed_times.append(self._clock())
        self._on_output(output)
        return output

    def _worker_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                while self._slot is None and not self._stop.is_set():
                    self._lock.wait(0.1)
                if self._stop.is_set():
                    return
                msg, received_at = self._slot
                self._slot = None
                self._busy = True
            try:
                self.process(msg, received_at)
            except Exception as error:  # noqa: BLE001  (e.g. a publish failing: the worker must live on)
                self.counts["processing_errors"] += 1
                self.report_error(f"publishing outputs failed: {type(error).__name__}: {error}", exc_info=True)
            finally:
                with self._lock:
                    self._busy = False
                    self._lock.notify_all()

    # ------------------------------------------------------------------------------ diagnostics
    def report_error(self, text: str, kind: str = "", exc_info: bool = False) -> None:
        """Record ``text`` as ``last_error`` and publish diagnostics at once (WARN for ERROR_HOLD_S); the log
        line is throttled per ``kind`` (default: the text before its first ':'), so a flood of bad input logs a
        line a second with the number suppressed instead of thousands."""
        self.last_error = text
        self._last_error_time = self._clock()
        self._error_log.error(kind or text.split(":", 1)[0], text, exc_info=exc_info)
        self._on_diagnostics(self.diagnostics())

    def diagnostics(self) -> Diagnostics:
        """Current health: frame rate, latency percentiles, drops, cache counters, backend, staleness, last error."""
        now = self._clock()
        with self._lock:
            counts = dict(self.counts)
            latencies = list(self._latencies)
            times = [t for t in self._processed_times if now - t <= 5.0]
            last_frame = self._last_frame_time
        fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        since = now - (last_frame if last_frame is not None else self._started_at)
        stale = self.state == "active" and since > self.params.stale_after_s
        values = {"fps": f"{fps:.2f}", "latency_p50_ms": f"{_percentile(latencies, 50):.1f}",
                  "latency_p99_ms": f"{_percentile(latencies, 99):.1f}",
                  "backend": str(getattr(self.segmenter, "backend_name", "unknown")),
                  "prompts": "; ".join(p.text for p in self.prompts), "stale": str(stale).lower(),
                  "seconds_since_last_frame": f"{since:.2f}", "last_error": self.last_error, "state": self.state}
        values.update({k: str(v) for k, v in counts.items()})
        values.update({k: str(v) for k, v in getattr(self.segmenter, "counters", {}).items()})
        if self.state != "active":
            level, message = OK, f"{self.state}: not processing frames until activated"
        elif stale:
            level = WARN
            message = f"stale input: no frame for {since:.1f} s (stale_after_s={self.params.stale_after_s})"
        elif self._last_error_time is not None and now - self._last_error_time <= ERROR_HOLD_S:
            level, message = WARN, self.last_error
        else:
            level, message = OK, "ok"
        return Diagnostics(level, message, values)

    def _diagnostics_loop(self) -> None:
        while not self._stop.wait(self.params.diagnostics_period_s):
            try:
                self._on_diagnostics(self.diagnostics())
            except Exception:  # noqa: BLE001  (a transport hiccup must not stop the watchdog)
                log.exception("publishing diagnostics failed")

    # ------------------------------------------------------------------------------- lifecycle
    def start(self) -> NodeCore:
        """Start the inference worker and the diagnostics/watchdog timer (daemon threads)."""
        self._stop.clear()
        self._worker = threading.Thread(target=self._worker_loop, name="fluorosam-infer", daemon=True)
        self._timer = threading.Thread(target=self._diagnostics_loop, name="fluorosam-diag", daemon=True)
        self._worker.start()
        self._timer.start()
        return self

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the slot is empty and the worker is idle (replay uses this); False on timeout."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._lock:
            while self._slot is not None or self._busy:
                remaining = None if deadline is None else deadline - self._clock()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(0.05 if remaining is None else min(0.05, remaining))
        return True

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        for thread in (self._worker, self._timer):
            if thread is not None:
                thread.join(timeout=5.0)
