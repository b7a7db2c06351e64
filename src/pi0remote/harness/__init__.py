"""The measuring wing: latency benchmark, success-rate evaluation, videos, charts, WAN emulation.

Robot code never needs to import this package; nothing here is imported by ``import pi0remote``.
"""
