package ipsec

// TunnelMTU returns the largest inner packet that fits, after tunnel-mode
// ESP with key k's algorithm, in one packet of underlayMTU bytes, with an
// IPv4 (underlay6 false) or IPv6 outer header. It is the kernel's
// computation (xfrm_state_mtu): the outer IP header, the 8-byte ESP header
// and the IV are fixed; payload, padding and the 2-byte trailer are
// rounded up to the cipher's block (4 bytes for AES-GCM, 16 for AES-CBC);
// the ICV follows. For a 1500-byte IPv4 underlay: 1446 with AES-GCM and a
// 128-bit ICV, 1438 with AES-CBC/HMAC-SHA-256-128. Pod interfaces need
// this MTU (or less) for full-size packets with DF set to pass.
func TunnelMTU(underlayMTU int, k Key, underlay6 bool) int {
	outer := 20
	if underlay6 {
		outer = 40
	}
	const espHeader = 8
	iv, block, icv := 8, 4, k.icvBits/8
	if k.alg == AESCBCHMACSHA256 {
		iv, block, icv = 16, 16, hmacTruncat/8
	}
	mtu := ((underlayMTU - outer - espHeader - iv - icv) &^ (block - 1)) - 2
	return max(mtu, 0)
}
