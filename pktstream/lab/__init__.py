"""A small lab for ``pktstream demo``, the benchmarks and the tests: network namespaces with veth
pairs (:mod:`pktstream.lab.netns`) and synthetic traffic (:mod:`pktstream.lab.traffic`).

Not part of the capture or streaming path; it ships in the package because ``pktstream demo`` (the
README's first command) creates a namespace and replays traffic through it.
"""
