// Package ipsectest holds test doubles for package ipsec: [Kernel], an
// in-memory fake of the XFRM part of a netlink handle (ipsec.Netlink) that
// records every operation in order and prints its state sorted, for golden
// comparisons. The real kernel path is tested for real in package ipsec
// (policies on the host, ESP in the kernel VM suite).
package ipsectest
