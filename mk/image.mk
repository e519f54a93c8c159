# The container image (included by the main Makefile): built from package registries alone.
#
#   make lock         re-resolve deploy/image/*.lock (hash-pinned) from pyproject.toml
#   make wheelhouse   pip download the locked wheels into wheelhouse/cpu (host network, hashes checked)
#   make image        CPU image;  make image-cuda  the CUDA variant (CUDA libraries from PyPI wheels)
#   make image-test   run the CPU image as a pod would and call every protocol (not part of `make test`)
#
# Base image: BASE_IMAGE if it is present locally or can be pulled; otherwise a Debian bookworm base
# built here with debootstrap from the Debian mirror apt already uses, imported into podman once
# (cached by .image/base-bookworm.stamp). The build itself needs no network for Python: the wheelhouse
# is copied into the build context and installed with --no-index --require-hashes.
#
# podman on a host like this one (root, hybrid cgroups, no registry) needs deploy/image/containers.conf
# (no default ulimits, cgroupfs, runc) and host networking for builds; docker works with the same targets.
CONTAINER ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null || echo podman)
IMAGE ?= ferry
IMAGE_TAG ?= 0.1.0
BASE_IMAGE ?= python:3.11-slim-bookworm
FALLBACK_BASE_IMAGE ?= localhost/ferry-base:bookworm
IMAGE_WORK := .image
WHEELHOUSE := wheelhouse
IMAGE_LOCKS := deploy/image/requirements.lock deploy/image/build-requirements.lock
IMAGE_TEST_PORT ?= 18080
IMAGE_TEST_GRPC_PORT ?= 18081
# The Debian mirror apt uses here (deb822 URIs: or one-line deb), for debootstrap.
DEBIAN_MIRROR ?= $(or $(shell cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
	/etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $$2} /^deb / {print $$2}' \
	| grep -E '/debian/?$$' | head -n1),http://deb.debian.org/debian)
CONTAINER_TOOLS := podman buildah runc debootstrap

ifeq ($(notdir $(CONTAINER)),podman)
export CONTAINERS_CONF := $(CURDIR)/deploy/image/containers.conf
CONTAINER_BUILD_FLAGS := --network host
else
CONTAINER_BUILD_FLAGS :=
endif

.PHONY: lock wheelhouse wheelhouse-cuda container-tools image-base image image-cuda image-test

lock:  ## re-resolve the image's hash-pinned lock files from pyproject.toml
	$(PYTHON) deploy/lock.py

# podman, buildah, runc and debootstrap from Debian when any is missing (docker users: set CONTAINER).
container-tools:
	@if [ "$(notdir $(CONTAINER))" = podman ]; then \
	  missing=""; for tool in $(CONTAINER_TOOLS); do \
	    command -v $$tool >/dev/null || [ -x /usr/sbin/$$tool ] || missing="$$missing $$tool"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  fi; \
	fi

$(WHEELHOUSE)/cpu/.stamp: $(IMAGE_LOCKS)
	rm -rf $(WHEELHOUSE)/cpu && mkdir -p $(WHEELHOUSE)/cpu
	$(PYTHON) -m pip download -q --no-deps --require-hashes -d $(WHEELHOUSE)/cpu $(addprefix -r ,$(IMAGE_LOCKS))
	touch $@

# The CUDA wheelhouse holds the CPU one (hard links) plus the CUDA libraries: about 1 GB more.
$(WHEELHOUSE)/cuda/.stamp: $(WHEELHOUSE)/cpu/.stamp deploy/image/cuda-requirements.lock
	rm -rf $(WHEELHOUSE)/cuda && mkdir -p $(WHEELHOUSE)/cuda
	cp -l $(WHEELHOUSE)/cpu/* $(WHEELHOUSE)/cuda/
	$(PYTHON) -m pip download -q --no-deps --require-hashes -d $(WHEELHOUSE)/cuda -r deploy/image/cuda-requirements.lock
	touch $@

wheelhouse: $(WHEELHOUSE)/cpu/.stamp
wheelhouse-cuda: $(WHEELHOUSE)/cuda/.stamp

# A Debian bookworm base from Debian packages alone (about 30 s, 200 MB), imported once.
$(IMAGE_WORK)/base-bookworm.stamp:
	@test "$(notdir $(CONTAINER))" = podman || { echo "the debootstrap base is imported with podman"; exit 1; }
	rm -rf $(IMAGE_WORK)/rootfs-bookworm && mkdir -p $(IMAGE_WORK)
	debootstrap --variant=minbase bookworm $(IMAGE_WORK)/rootfs-bookworm $(DEBIAN_MIRROR)
	rm -rf $(IMAGE_WORK)/rootfs-bookworm/var/cache/apt/archives/*.deb $(IMAGE_WORK)/rootfs-bookworm/var/lib/apt/lists/*
	tar -C $(IMAGE_WORK)/rootfs-bookworm -c . | $(CONTAINER) import --change 'CMD ["/bin/bash"]' - $(FALLBACK_BASE_IMAGE)
	rm -rf $(IMAGE_WORK)/rootfs-bookworm
	$(CONTAINER) image inspect --format '{{.Id}}' $(FALLBACK_BASE_IMAGE) > $@

# Writes the base to build on into .image/base-ref: BASE_IMAGE when it is here or can be pulled.
image-base: container-tools
	@mkdir -p $(IMAGE_WORK); \
	if $(CONTAINER) image inspect $(BASE_IMAGE) >/dev/null 2>&1 \
	   || timeout 300 $(CONTAINER) pull -q $(BASE_IMAGE) >/dev/null 2>&1; then \
	  echo "base image: $(BASE_IMAGE)"; echo $(BASE_IMAGE) > $(IMAGE_WORK)/base-ref; \
	else \
	  echo "base image: $(BASE_IMAGE) cannot be pulled; using $(FALLBACK_BASE_IMAGE) (debootstrap, Debian bookworm)"; \
	  $(CONTAINER) image inspect $(FALLBACK_BASE_IMAGE) >/dev/null 2>&1 || rm -f $(IMAGE_WORK)/base-bookworm.stamp; \
	  $(MAKE) --no-print-directory $(IMAGE_WORK)/base-bookworm.stamp && echo $(FALLBACK_BASE_IMAGE) > $(IMAGE_WORK)/base-ref; \
	fi

# One build per variant; prints how long it took and the image's size.
define build_image
	@start=$$(date +%s); \
	$(CONTAINER) build $(CONTAINER_BUILD_FLAGS) --build-arg BASE_IMAGE=$$(cat $(IMAGE_WORK)/base-ref) \
	  --build-arg VARIANT=$(1) -t $(2) . && \
	echo "image $(2): built in $$(( $$(date +%s) - start )) s on $$(cat $(IMAGE_WORK)/base-ref)," \
	  "size $$($(CONTAINER) image inspect --format '{{.Size}}' $(2) | awk '{printf "%.0f MB", $$1 / 1e6}')"
endef

image: image-base wheelhouse  ## CPU image, from package registries alone
	$(call build_image,cpu,$(IMAGE):$(IMAGE_TAG))

image-cuda: image-base wheelhouse-cuda  ## CUDA variant for GPU nodes
	$(call build_image,cuda,$(IMAGE):$(IMAGE_TAG)-cuda)

# Runs the CPU image as a pod would (read-only root, uid 10001, every capability dropped, no new
# privileges, the tiny model read-only at /mnt/models) on 127.0.0.1 and calls V1, V2 REST, V2 gRPC,
# /generate, OpenAI and /metrics, then SIGTERM: exit status 0 expected.
image-test: image $(VENV)/.stamp-dev $(TINY_MODEL_DIR)/model.bin
	$(PY) deploy/image_test.py --container $(CONTAINER) --image $(IMAGE):$(IMAGE_TAG) \
	  --model-dir $(TINY_MODEL_DIR) --http-port $(IMAGE_TEST_PORT) --grpc-port $(IMAGE_TEST_GRPC_PORT)

# One prepared check for a machine with an NVIDIA GPU (not part of `make test`): the offline model,
# the engine ceiling, ferry with device auto + int8_float16 at 1 and 40 users, the KServe floor, one
# summary, under 8 minutes. Exits 2 at once when no CUDA GPU is found.
.PHONY: gpu-check
gpu-check: $(VENV)/.stamp-dev
	$(PY) tools/gpu_check.py --model-dir $(MODEL_DIR)
