"""Units, defined once: sizes are computed in bytes and converted only when rendered (GiB is 2**30, labelled GiB);
bandwidths are GB/s (10**9 bytes per second), as GPU and interconnect datasheets state them."""

KIB = 2**10
MIB = 2**20
GIB = 2**30
GB = 10**9  # one GB/s of a `*_gbps` bandwidth is GB bytes per second
