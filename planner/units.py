"""Units, defined once: sizes are computed in bytes and converted only when rendered (GiB is 2**30, labelled GiB).
Bandwidths (`*_gbps` fields and constants) are GB/s, 10**9 bytes per second, as GPU and interconnect datasheets
state them."""

MIB = 2**20
GIB = 2**30
