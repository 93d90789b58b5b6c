"""Benchmarks behind `hf-flash bench`: kernels, decode, e2e. Each module exposes run(quick, out_dir) -> dict."""
