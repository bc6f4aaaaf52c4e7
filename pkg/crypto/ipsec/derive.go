package ipsec

import (
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// hkdfLabel starts the HKDF info of every derived key; bump the version if
// the construction ever changes.
const hkdfLabel = "meshcrypt-ipsec-v1"

// maxBootIDLen bounds a boot ID (Linux's are 36-character UUIDs).
const maxBootIDLen = 255

// SA names one security association: the pod traffic of one address
// family (the inner family; the underlay may be of the other) that node Src
// encrypts and node Dst decrypts. Each SA has its own key ([DeriveKey]) and,
// per keyring key, its own SPI ([SA.SPI]).
//
// One SA cannot carry both inner families: the kernel sets a state's
// selector family to its outer family unless the state has the
// XFRM_STATE_AF_UNSPEC flag, which vishvananda/netlink cannot set; so
// IPv4 and IPv6 pods get an SA each, whose state selects its family.
type SA struct {
	Src, Dst Node
	// IPv6 is true for the SA carrying IPv6 pod traffic, false for IPv4.
	IPv6 bool
}

// SPI returns the SPI carried in the ESP header of the SA's packets under
// the keyring key keyringSPI:
//
//	bits 31-28  keyring SPI (1-15)
//	bits 27-12  source node ID (16 bits)
//	bit  11     inner family: 0 IPv4, 1 IPv6
//	bits 10-0   low 11 bits of the destination node ID
//
// A receiver looks its inbound states up by (its own address, SPI, ESP), so
// the SPI must be unique per (keyring SPI, sender, inner family) at each
// receiver: the top 21 bits are exactly that. The low bits add nothing to
// uniqueness (the receiver is fixed) but spread SPIs for NIC hashing and
// make `ip xfrm state` readable. With keyringSPI >= 1 every SPI is >=
// 0x10000000, far from the range 1-255 that RFC 4303 reserves.
func (sa SA) SPI(keyringSPI uint8) uint32 {
	spi := uint32(keyringSPI&0xf)<<28 | uint32(sa.Src.ID)<<12 | uint32(sa.Dst.ID)&0x7ff
	if sa.IPv6 {
		spi |= 1 << 11
	}
	return spi
}

// SplitSPI is the inverse of [SA.SPI], for status output: the keyring SPI,
// the source node ID, the low 11 bits of the destination node ID and the
// inner family.
func SplitSPI(spi uint32) (keyringSPI uint8, src, dstLow uint16, ipv6 bool) {
	return uint8(spi >> 28), uint16(spi >> 12), uint16(spi & 0x7ff), spi&(1<<11) != 0
}

// DeriveKey returns the ESP key material of sa under the keyring key k. The
// result has the length of k's material and the same layout (AES key then
// salt for AES-GCM, AES key then HMAC key for AES-CBC/HMAC-SHA-256), so
// every node pair, each direction and each inner family has its own key,
// and no keyring key is ever used on the wire.
//
// The construction is HKDF-SHA256 (RFC 5869) with
//
//	IKM  = k's material, as in the keyring
//	salt = none (HKDF's default: 32 zero bytes)
//	info = "meshcrypt-ipsec-v1" 0x00
//	       len16(algorithm) algorithm      e.g. "rfc4106(gcm(aes))"
//	       be16(ICV bits)
//	       u8(keyring SPI)
//	       u8(inner family: 4 or 6)
//	       be16(src ID)  len16(src boot ID)  src boot ID  len16(src addr)  src addr
//	       be16(dst ID)  len16(dst boot ID)  dst boot ID  len16(dst addr)  dst addr
//	L    = len(IKM)
//
// where len16 and be16 are big-endian 16-bit integers and the addresses are
// the underlay addresses in their 4 or 16-byte form (IPv4-mapped IPv6
// addresses unmapped). Every variable field is length-prefixed, so distinct
// inputs give distinct info strings.
//
// Why each input: the node IDs and the order src, dst make keys per pair
// and per direction (key(A->B) != key(B->A)), the inner family per SA. The
// boot IDs give a rebooted node fresh keys: its states, and their ESP
// sequence numbers, restart from scratch, and with AES-GCM a sequence
// number reused under the same key reuses a nonce. The underlay addresses
// do the same when a node's address changes (the states are re-created,
// their sequence numbers restart). The keyring SPI, algorithm and ICV
// separate keys of different keyring entries and transforms even if an
// operator reuses material.
//
// DeriveKey fails when k is invalid, a node ID is 0, a boot ID is empty or
// longer than 255 bytes, or an underlay address is invalid. It is pure.
func DeriveKey(k Key, sa SA) ([]byte, error) {
	if len(k.material) == 0 {
		return nil, errors.New("derive key: invalid (zero) keyring key")
	}
	info, err := deriveInfo(k, sa)
	if err != nil {
		return nil, fmt.Errorf("derive key %s->%s: %w", sa.Src.Name, sa.Dst.Name, err)
	}
	out, err := hkdf.Key(sha256.New, k.material, nil, info, len(k.material))
	if err != nil {
		return nil, fmt.Errorf("derive key %s->%s: %w", sa.Src.Name, sa.Dst.Name, err)
	}
	return out, nil
}

// deriveInfo builds DeriveKey's HKDF info string.
func deriveInfo(k Key, sa SA) (string, error) {
	b := make([]byte, 0, 128)
	b = append(b, hkdfLabel...)
	b = append(b, 0)
	b = appendLV(b, []byte(k.alg))
	b = binary.BigEndian.AppendUint16(b, uint16(k.icvBits))
	b = append(b, k.spi)
	if sa.IPv6 {
		b = append(b, 6)
	} else {
		b = append(b, 4)
	}
	for _, n := range []Node{sa.Src, sa.Dst} {
		if n.ID == 0 {
			return "", fmt.Errorf("node %s: IPsec node ID 0", n.Name)
		}
		if n.BootID == "" || len(n.BootID) > maxBootIDLen {
			return "", fmt.Errorf("node %s: boot ID of %d bytes, want 1-%d", n.Name, len(n.BootID), maxBootIDLen)
		}
		if !n.Underlay.IsValid() {
			return "", fmt.Errorf("node %s: no underlay address", n.Name)
		}
		b = binary.BigEndian.AppendUint16(b, n.ID)
		b = appendLV(b, []byte(n.BootID))
		b = appendLV(b, n.Underlay.Unmap().AsSlice())
	}
	return string(b), nil
}

func appendLV(b, v []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(v)))
	return append(b, v...)
}
