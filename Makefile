# vmbond: the two commands a newcomer needs are `make demo` and `make test`.
.PHONY: build demo test bench deps guest clean

build:
	go build -o bin/vmbond ./cmd/vmbond

deps:
	bash scripts/deps.sh

guest: deps
	bash guest/build.sh build/guest

demo: deps build guest
	bash demo/demo.sh

test:
	bash scripts/test.sh

bench: deps build guest
	bash scripts/bench.sh

clean:
	rm -rf bin build
