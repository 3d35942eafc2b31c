# Thin wrappers; the knobs are environment variables (README.md, "Build knobs"),
# e.g.  make build FLASH_ATTN_CUDA_ARCHS=90 FLASH_ATTN_HEAD_DIMS=64,128
PYTHON ?= python3
FACTORY = $(PYTHON) -m scripts.factory

.PHONY: build ci-build test lint clean distclean

## build: compile the kernels (cached in build/kernels) and flash_attn._C in place
build:
	$(PYTHON) setup.py build_ext --inplace

## ci-build: the same with the reduced kernel set CI builds: the knobs of [kernels.ci] in
## recipes/matrix.toml, as the factory reads them (kernel-env prints NAME=value lines)
ci-build:
	@knobs="$$($(FACTORY) kernel-env --kernels ci)" && echo "ci-build: [kernels.ci]:" $$knobs && \
	env $$knobs $(PYTHON) setup.py build_ext --inplace

## test: ruff, then the tests (GPU tests skip without a GPU); fails if either fails
test:
	@$(PYTHON) -m ruff check . ; lint=$$? ; \
	$(PYTHON) -m pytest -q tests ; tests=$$? ; \
	if [ $$lint -ne 0 ]; then echo "make test: ruff check failed (see above)"; fi ; \
	exit $$(( tests != 0 ? tests : lint ))

## lint: ruff only
lint:
	$(PYTHON) -m ruff check .

## clean: build outputs, but not the kernel object cache (build/kernels), which is
## content-addressed and never stale; distclean removes that too
clean:
	find build -mindepth 1 -maxdepth 1 ! -name kernels -exec rm -rf {} + 2>/dev/null || true
	rm -rf flash_attn/_C*.so *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf build .ruff_cache

## --- wheel factory (scripts/factory; README.md, "Wheels") ---------------------
# MATRIX: a preset (local, ci, release) or an inline selection, e.g.
#   make wheels MATRIX="torch=2.13 python=3.11 cuda=13.0"
# ENGINE: none (build here) or docker/podman (each cell in a container with the matrix's
# limits; README.md, "Containers"). BASE_IMAGE, WHEELHOUSE, CONTAINER_RUNTIME and
# CONTAINER_ULIMITS are read from the environment; FAIL_FAST=1 stops at the first failed cell;
# OFFLINE=1 builds the images without network, from WHEELHOUSE alone (--offline);
# CMD="..." makes `make dev` run that one command in the dev image and exit with its status.
MATRIX ?= local
TOOLCHAIN ?= system
ENGINE ?= none
FAIL_FAST ?=
OFFLINE ?=
CMD ?=
DEV_MATRIX ?= torch=2.14 python=3.11 cuda=13.0
# These settings are data, never code: each is taken as written (make's $(value), so a
# `$(shell ...)` in it is not expanded) and reaches the factory through the environment.
# No recipe writes one into its command line: the factory reads MATRIX from the
# environment, the recipes pass "$$TOOLCHAIN" and "$$ENGINE" as quoted shell variables
# (expanded once, never parsed), and the factory checks every value (exit 2).
SETTINGS := MATRIX TOOLCHAIN ENGINE FAIL_FAST OFFLINE CMD DEV_MATRIX
$(foreach v,$(SETTINGS),$(eval override $(v) := $$(value $(v))))
export $(SETTINGS)
OFFLINE_ARGS = $(if $(filter 1 yes true,$(OFFLINE)),--offline,)
ENGINE_ARGS = --engine "$$ENGINE" $(if $(filter 1 yes true,$(FAIL_FAST)),--fail-fast,) $(OFFLINE_ARGS)

.PHONY: matrix matrix-json provision plan build-wheels wheels report doctor dev-image dev
.PHONY: refresh-matrix check-matrix

## matrix: print the cells of MATRIX; matrix-json: the GitHub Actions matrix
matrix:
	@$(FACTORY) matrix

matrix-json:
	@$(FACTORY) matrix --json

## plan: each cell's build plan (cache hits, jobs x threads and why)
plan:
	@$(FACTORY) plan

## provision: each cell's toolchain; build-wheels: build and tag, no smoke test or publish
provision:
	@$(FACTORY) provision --toolchain "$$TOOLCHAIN"

build-wheels:
	@$(FACTORY) build --toolchain "$$TOOLCHAIN" $(ENGINE_ARGS)

## wheels: build, tag, smoke-test and publish every cell of MATRIX into dist/whl
wheels:
	@$(FACTORY) wheels --toolchain "$$TOOLCHAIN" $(ENGINE_ARGS)

## refresh-matrix: the torch table of recipes/matrix.toml from the torch wheels' own
## metadata on the package index, then what derives from it (recipes/conda/variants.yaml);
## check-matrix: compare only (exit 1 when the index has other or newer releases)
refresh-matrix:
	@$(FACTORY) refresh-matrix && $(FACTORY) conda-variants

check-matrix:
	@$(FACTORY) refresh-matrix --check

## report: the last `make wheels` table; doctor: which variant this environment needs
report:
	@$(FACTORY) report

doctor:
	@$(FACTORY) doctor

## dev-image: the builder image of DEV_MATRIX's first cell plus test and lint tools;
## dev: a shell in it with this checkout at /src (both need ENGINE=docker or podman);
## make dev CMD="make test" runs that one command there and exits with its status
dev-image:
	@MATRIX="$$DEV_MATRIX" $(FACTORY) dev-image --engine "$$ENGINE" $(OFFLINE_ARGS)

dev:
	@MATRIX="$$DEV_MATRIX" $(FACTORY) dev --engine "$$ENGINE"
