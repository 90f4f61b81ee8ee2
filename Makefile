# The README's two commands are `make demo` and `make test`; everything else
# here is a convenience for developers.
GO ?= go
export PATH := $(PATH):/usr/local/go/bin

.PHONY: demo test deps build vet fuzz bench image

# Host packages, then the cached test fixtures: the tiny guest (kernel +
# initramfs) and the Debian trixie root with QEMU 10 / libvirt 11. Each step
# is a no-op when its cache is current.
deps:
	hack/install-deps.sh
	hack/guest-image.sh
	hack/trixie-root.sh

# The main job: a demo on an embedded default, no cluster needed.
demo:
	hack/install-deps.sh
	$(GO) run ./cmd/virtblk demo

# The test suite CI runs (.ci/run). Race detector on everything: the data
# plane is concurrent by design.
test: deps vet
	$(GO) test -race -timeout 40m ./...

vet:
	$(GO) vet ./...

build:
	mkdir -p bin
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/ ./cmd/...

# Short coverage-guided fuzzing of every untrusted-input parser.
FUZZTIME ?= 30s
fuzz:
	@for pkg in $$($(GO) list ./...); do \
		for f in $$($(GO) test -list 'Fuzz.*' $$pkg 2>/dev/null | grep '^Fuzz'); do \
			echo "== $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
		done; \
	done

bench:
	hack/bench-vhost-user.sh

image:
	hack/build-image.sh
