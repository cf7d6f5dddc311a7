# The two set-up commands of the README, plus helpers. Every target first installs the system
# packages the build needs when they are missing (scripts/setup.sh), so a fresh machine works.

CARGO ?= cargo

.PHONY: setup demo test lint bench

setup:
	@scripts/setup.sh

# Runs Meridian. Until the SQL layer brings `meridian demo`, this is the storage tour:
# TrueTime, commit-wait and MVCC on RocksDB.
demo: setup
	$(CARGO) run -p meridian-storage --example tour

# Runs every test of the workspace.
test: setup
	$(CARGO) test --workspace

# Formatting and lints, as CI checks them.
lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Criterion benchmarks (release build); see bench/README.md.
bench: setup
	$(CARGO) bench --workspace
