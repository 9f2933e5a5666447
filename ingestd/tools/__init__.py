"""Tooling apart from the runtime: the benchmark, the soak, the fuzz campaign, throwaway servers,
the simulator and its fault scenarios. The daemon never imports these."""
