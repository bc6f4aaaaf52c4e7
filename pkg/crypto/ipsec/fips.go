package ipsec

import (
	"errors"
	"fmt"
	"os"
	"strings"
)

// FIPSPath is where Linux reports whether it runs in FIPS mode.
const FIPSPath = "/proc/sys/crypto/fips_enabled"

// FIPSEnabled reports whether the kernel runs in FIPS mode: the file at path
// ("" means [FIPSPath]) holds "1". A missing or unreadable file means the
// kernel was not booted with fips=1 (kernels without CONFIG_CRYPTO_FIPS have
// no such file), so false.
//
// Under FIPS the agent must refuse WireGuard (ChaCha20-Poly1305 and
// Curve25519 are not FIPS-approved) and accept only keyrings that pass
// [CheckFIPS].
func FIPSEnabled(path string) bool {
	if path == "" {
		path = FIPSPath
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	return strings.TrimSpace(string(b)) == "1"
}

// FIPSApproved reports whether the algorithm is approved for ESP under FIPS
// 140 (NIST SP 800-77r1): AES-GCM (SP 800-38D) and AES-CBC with
// HMAC-SHA-256 (SP 800-38A, FIPS 198-1). Anything else is not.
func (a Algorithm) FIPSApproved() bool {
	switch a {
	case AESGCM, AESCBCHMACSHA256:
		return true
	}
	return false
}

// FIPSApproved reports whether the key may be used under FIPS: its
// algorithm is approved and, for AES-GCM, its ICV is the full 128 bits (the
// 64 and 96-bit tags are allowed by SP 800-38D only with limits on their
// use that this package does not enforce, so they are refused).
func (k Key) FIPSApproved() bool {
	if !k.alg.FIPSApproved() {
		return false
	}
	return k.alg != AESGCM || k.icvBits == 128
}

// ErrNotFIPSApproved is wrapped by [CheckFIPS] for keys that FIPS mode
// forbids.
var ErrNotFIPSApproved = errors.New("not FIPS-approved")

// CheckFIPS returns an error wrapping [ErrNotFIPSApproved] that names every
// key of kr that may not be used in FIPS mode, or nil. The agent calls it
// when [FIPSEnabled] and refuses the keyring on error. The HKDF-SHA256
// derivation of [DeriveKey] is an approved KDF (SP 800-56C) and Go's
// crypto/hkdf is part of its FIPS 140-3 module.
func CheckFIPS(kr Keyring) error {
	var bad []string
	for _, k := range kr.keys {
		if !k.FIPSApproved() {
			bad = append(bad, k.String())
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("keyring keys %s: %w", strings.Join(bad, "; "), ErrNotFIPSApproved)
	}
	return nil
}
