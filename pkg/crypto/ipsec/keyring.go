package ipsec

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strconv"
	"strings"
)

// SecretName is the name of the Secret, in the agent's namespace, whose data
// key [SecretKey] holds the keyring text that [ParseKeyring] reads.
const SecretName = "meshcrypt-ipsec-keys"

// SecretKey is the data key of the keyring in the Secret [SecretName].
const SecretKey = "keys"

// SPI limits of the keyring: the keyring SPI is 4 bits on the wire (see
// [SA.SPI]) and 0 is never used.
const (
	MinSPI = 1
	MaxSPI = 15
)

// Algorithm names an ESP transform as the keyring writes it.
type Algorithm string

// Algorithms the keyring accepts. Both are approved under FIPS 140 (see
// [Key.FIPSApproved]).
const (
	// AESGCM is AES-GCM as ESP uses it (RFC 4106): the kernel's
	// rfc4106(gcm(aes)) AEAD. Its key material is the AES key (16, 24 or 32
	// bytes) followed by the 4-byte salt. The default and preferred
	// transform: one pass, hardware-accelerated, 16-byte ICV by default.
	AESGCM Algorithm = "rfc4106(gcm(aes))"
	// AESCBCHMACSHA256 is AES-CBC encryption with HMAC-SHA-256-128
	// authentication (RFC 4868): the kernel's cbc(aes) with hmac(sha256)
	// truncated to 128 bits. Its key material is the AES key (16, 24 or 32
	// bytes) followed by the 32-byte HMAC key.
	AESCBCHMACSHA256 Algorithm = "cbc(aes)+hmac(sha256)"
)

// Key lengths, in bytes.
const (
	gcmSaltLen  = 4
	hmacKeyLen  = 32
	defaultICV  = 128 // bits
	hmacTruncat = 128 // bits: HMAC-SHA-256-128
)

// String returns the algorithm's keyring name.
func (a Algorithm) String() string { return string(a) }

// validAESKeyLen reports whether n bytes is an AES key length.
func validAESKeyLen(n int) bool { return n == 16 || n == 24 || n == 32 }

// Key is one keyring entry. Its key material never appears in String,
// GoString or log output; only [Keyring.Encode] writes it out. The zero Key
// is invalid; build Keys with [ParseKeyring], [NewKey] or [GenerateKey].
type Key struct {
	spi      uint8
	alg      Algorithm
	material []byte
	icvBits  int
}

// NewKey returns a validated key. material is, for [AESGCM], the AES key
// followed by the 4-byte salt (20, 28 or 36 bytes); for [AESCBCHMACSHA256],
// the AES key followed by the 32-byte HMAC key (48, 56 or 64 bytes).
// icvBits is the AES-GCM ICV length, 64, 96 or 128; 0 means 128. It must be
// 0 for AESCBCHMACSHA256, whose ICV is always 128 bits. material is copied.
func NewKey(spi uint8, alg Algorithm, material []byte, icvBits int) (Key, error) {
	if spi < MinSPI || spi > MaxSPI {
		return Key{}, fmt.Errorf("SPI %d out of range %d-%d", spi, MinSPI, MaxSPI)
	}
	switch alg {
	case AESGCM:
		if n := len(material) - gcmSaltLen; !validAESKeyLen(n) {
			return Key{}, fmt.Errorf("%s key is %d bytes, want 20, 28 or 36 (a 16, 24 or 32-byte AES key and a 4-byte salt)", alg, len(material))
		}
		switch icvBits {
		case 0:
			icvBits = defaultICV
		case 64, 96, 128:
		default:
			return Key{}, fmt.Errorf("%s ICV of %d bits, want 64, 96 or 128", alg, icvBits)
		}
	case AESCBCHMACSHA256:
		if n := len(material) - hmacKeyLen; !validAESKeyLen(n) {
			return Key{}, fmt.Errorf("%s key material is %d bytes, want 48, 56 or 64 (a 16, 24 or 32-byte AES key and a 32-byte HMAC key)", alg, len(material))
		}
		if icvBits != 0 && icvBits != hmacTruncat {
			return Key{}, fmt.Errorf("%s ICV is always %d bits, not %d", alg, hmacTruncat, icvBits)
		}
		icvBits = hmacTruncat
	default:
		return Key{}, fmt.Errorf("unknown algorithm %s (want %s or %s)", quoteShort(string(alg)), AESGCM, AESCBCHMACSHA256)
	}
	return Key{spi: spi, alg: alg, material: bytes.Clone(material), icvBits: icvBits}, nil
}

// GenerateKey returns a new key with random material read from rand
// (crypto/rand.Reader in production) and the full-length AES key: AES-256
// for both algorithms, with a 128-bit ICV.
func GenerateKey(rand io.Reader, spi uint8, alg Algorithm) (Key, error) {
	var n int
	switch alg {
	case AESGCM:
		n = 32 + gcmSaltLen
	case AESCBCHMACSHA256:
		n = 32 + hmacKeyLen
	default:
		return Key{}, fmt.Errorf("generate key: unknown algorithm %s", quoteShort(string(alg)))
	}
	m := make([]byte, n)
	if _, err := io.ReadFull(rand, m); err != nil {
		return Key{}, fmt.Errorf("generate key: %w", err)
	}
	return NewKey(spi, alg, m, 0)
}

// SPI returns the keyring SPI, 1-15.
func (k Key) SPI() uint8 { return k.spi }

// Algorithm returns the key's algorithm.
func (k Key) Algorithm() Algorithm { return k.alg }

// ICVBits returns the integrity check value length in bits.
func (k Key) ICVBits() int { return k.icvBits }

// KeyBits returns the AES key length in bits (128, 192 or 256).
func (k Key) KeyBits() int {
	switch k.alg {
	case AESGCM:
		return (len(k.material) - gcmSaltLen) * 8
	case AESCBCHMACSHA256:
		return (len(k.material) - hmacKeyLen) * 8
	}
	return 0
}

// Equal reports whether k and o are the same key: SPI, algorithm, ICV and
// material.
func (k Key) Equal(o Key) bool {
	return k.spi == o.spi && k.alg == o.alg && k.icvBits == o.icvBits && bytes.Equal(k.material, o.material)
}

// String describes the key without its material, e.g.
// "spi=2 rfc4106(gcm(aes)) aes=256 icv=128".
func (k Key) String() string {
	return fmt.Sprintf("spi=%d %s aes=%d icv=%d", k.spi, k.alg, k.KeyBits(), k.icvBits)
}

// GoString is String: %#v must not print the material either.
func (k Key) GoString() string { return "ipsec.Key{" + k.String() + "}" }

// LogValue implements slog.LogValuer without the material.
func (k Key) LogValue() slog.Value { return slog.StringValue(k.String()) }

// line is the key's keyring line (with its material).
func (k Key) line() string {
	switch k.alg {
	case AESCBCHMACSHA256:
		split := len(k.material) - hmacKeyLen
		return fmt.Sprintf("%d %s %x %x", k.spi, k.alg, k.material[:split], k.material[split:])
	default:
		return fmt.Sprintf("%d %s %x %d", k.spi, k.alg, k.material, k.icvBits)
	}
}

// Keyring is the parsed keyring: keys ordered by SPI, at most one per SPI.
// The zero Keyring is empty.
type Keyring struct {
	keys []Key
}

// NewKeyring returns a keyring holding keys, which must have distinct SPIs
// (and be valid, as from [NewKey]).
func NewKeyring(keys ...Key) (Keyring, error) {
	var kr Keyring
	for _, k := range keys {
		var err error
		if kr, err = kr.Add(k); err != nil {
			return Keyring{}, err
		}
	}
	return kr, nil
}

// Keys returns the keys ordered by SPI.
func (kr Keyring) Keys() []Key { return slices.Clone(kr.keys) }

// Len returns the number of keys.
func (kr Keyring) Len() int { return len(kr.keys) }

// SPIs returns the keyring SPIs in ascending order.
func (kr Keyring) SPIs() []uint8 {
	out := make([]uint8, len(kr.keys))
	for i, k := range kr.keys {
		out[i] = k.spi
	}
	return out
}

// Key returns the key with the given SPI.
func (kr Keyring) Key(spi uint8) (Key, bool) {
	for _, k := range kr.keys {
		if k.spi == spi {
			return k, true
		}
	}
	return Key{}, false
}

// Current returns the key with the highest SPI: the key senders move to
// once every node has installed it. ok is false for an empty keyring.
//
// With "the highest is current", SPIs do not wrap: after 15 the next
// rotation needs a keyring holding only lower SPIs, e.g. {15} -> {1},
// which is not hitless (receivers lose SPI 15 while senders may still use
// it). Start at 1 and remove old keys after each rotation; 14 rotations
// are then hitless.
func (kr Keyring) Current() (k Key, ok bool) {
	if len(kr.keys) == 0 {
		return Key{}, false
	}
	return kr.keys[len(kr.keys)-1], true
}

// Add returns a keyring with k added; it fails if k's SPI is already used
// or k is invalid. kr is unchanged.
func (kr Keyring) Add(k Key) (Keyring, error) {
	if k.alg == "" {
		return kr, errors.New("add key: invalid (zero) key")
	}
	if _, dup := kr.Key(k.spi); dup {
		return kr, fmt.Errorf("add key: duplicate SPI %d", k.spi)
	}
	keys := append(slices.Clone(kr.keys), k)
	slices.SortFunc(keys, func(a, b Key) int { return int(a.spi) - int(b.spi) })
	return Keyring{keys: keys}, nil
}

// Remove returns a keyring without the key with the given SPI (unchanged if
// there is none). kr is unchanged.
func (kr Keyring) Remove(spi uint8) Keyring {
	return Keyring{keys: slices.DeleteFunc(slices.Clone(kr.keys), func(k Key) bool { return k.spi == spi })}
}

// Equal reports whether kr and o hold the same keys.
func (kr Keyring) Equal(o Keyring) bool { return slices.EqualFunc(kr.keys, o.keys, Key.Equal) }

// String lists the keys without their material.
func (kr Keyring) String() string {
	parts := make([]string, len(kr.keys))
	for i, k := range kr.keys {
		parts[i] = k.String()
	}
	return "[" + strings.Join(parts, ", ") + "]"
}

// GoString is String: %#v must not print key material either.
func (kr Keyring) GoString() string { return "ipsec.Keyring" + kr.String() }

// LogValue implements slog.LogValuer without key material.
func (kr Keyring) LogValue() slog.Value { return slog.StringValue(kr.String()) }

// Encode returns the keyring in the text format [ParseKeyring] reads, one
// line per key in SPI order, WITH the key material: it is what goes into
// the Secret, and must never be logged. AES-GCM lines always carry the ICV.
func (kr Keyring) Encode() []byte {
	var b bytes.Buffer
	for _, k := range kr.keys {
		b.WriteString(k.line())
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// ParseKeyring parses the keyring text of the Secret [SecretName]. Each
// line is one of
//
//	SPI rfc4106(gcm(aes)) KEY [ICV]
//	SPI cbc(aes)+hmac(sha256) ENCKEY AUTHKEY
//
// separated by spaces or tabs, where SPI is a decimal number from 1 to 15;
// for AES-GCM, KEY is the hex of the AES key followed by the 4-byte salt
// (20, 28 or 36 bytes: 40, 56 or 72 hex digits) and ICV the ICV length in
// bits, 128 (the default), 96 or 64; for AES-CBC with HMAC-SHA-256-128,
// ENCKEY is the hex of the AES key (16, 24 or 32 bytes) and AUTHKEY the hex
// of the 32-byte HMAC key. Hex may start with 0x and use either case. Blank
// lines and lines starting with '#' (after optional blanks) are ignored.
//
// Errors name the line (from 1) and never contain key material. Duplicate
// SPIs, SPIs out of range, wrong key lengths, unknown algorithms and a
// keyring without keys are rejected; all errors are reported, joined.
func ParseKeyring(data []byte) (Keyring, error) {
	var (
		kr   Keyring
		errs []error
		seen = map[uint8]int{} // SPI -> line
	)
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 1<<20)
	lineNo := 0
	for sc.Scan() {
		lineNo++
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		k, err := parseKeyLine(text)
		if err != nil {
			errs = append(errs, fmt.Errorf("keyring line %d: %w", lineNo, err))
			continue
		}
		if first, dup := seen[k.spi]; dup {
			errs = append(errs, fmt.Errorf("keyring line %d: duplicate SPI %d (first on line %d)", lineNo, k.spi, first))
			continue
		}
		seen[k.spi] = lineNo
		kr.keys = append(kr.keys, k)
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, fmt.Errorf("keyring line %d: %w", lineNo+1, err))
	}
	if len(errs) > 0 {
		return Keyring{}, errors.Join(errs...)
	}
	if len(kr.keys) == 0 {
		return Keyring{}, errors.New("keyring has no keys")
	}
	slices.SortFunc(kr.keys, func(a, b Key) int { return int(a.spi) - int(b.spi) })
	return kr, nil
}

// parseKeyLine parses one non-blank, non-comment keyring line.
func parseKeyLine(text string) (Key, error) {
	f := strings.Fields(text)
	if len(f) < 3 {
		return Key{}, errors.New("want SPI ALGORITHM KEY... (too few fields)")
	}
	n, err := strconv.ParseUint(f[0], 10, 8)
	if err != nil || n < MinSPI || n > MaxSPI {
		return Key{}, fmt.Errorf("SPI %s is not a number from %d to %d", quoteShort(f[0]), MinSPI, MaxSPI)
	}
	spi := uint8(n)
	alg := Algorithm(f[1])
	switch alg {
	case AESGCM:
		if len(f) > 4 {
			return Key{}, fmt.Errorf("%s: want SPI %s KEY [ICV] (%d fields)", alg, alg, len(f))
		}
		m, err := parseHex(f[2])
		if err != nil {
			return Key{}, fmt.Errorf("%s key: %w", alg, err)
		}
		icv := 0
		if len(f) == 4 {
			v, err := strconv.Atoi(f[3])
			if err != nil {
				return Key{}, fmt.Errorf("%s ICV %s is not a number of bits", alg, quoteShort(f[3]))
			}
			if v == 0 {
				v = -1 // "0" is not a valid ICV; do not let it mean the default
			}
			icv = v
		}
		return NewKey(spi, alg, m, icv)
	case AESCBCHMACSHA256:
		if len(f) != 4 {
			return Key{}, fmt.Errorf("%s: want SPI %s ENCKEY AUTHKEY (%d fields)", alg, alg, len(f))
		}
		enc, err := parseHex(f[2])
		if err != nil {
			return Key{}, fmt.Errorf("%s encryption key: %w", alg, err)
		}
		auth, err := parseHex(f[3])
		if err != nil {
			return Key{}, fmt.Errorf("%s authentication key: %w", alg, err)
		}
		if !validAESKeyLen(len(enc)) {
			return Key{}, fmt.Errorf("%s encryption key is %d bytes, want 16, 24 or 32", alg, len(enc))
		}
		if len(auth) != hmacKeyLen {
			return Key{}, fmt.Errorf("%s authentication key is %d bytes, want %d", alg, len(auth), hmacKeyLen)
		}
		return NewKey(spi, alg, append(enc, auth...), 0)
	default:
		return Key{}, fmt.Errorf("unknown algorithm %s (want %s or %s)", quoteShort(f[1]), AESGCM, AESCBCHMACSHA256)
	}
}

// parseHex decodes hex key material; its errors never quote the input.
func parseHex(s string) ([]byte, error) {
	s = strings.TrimPrefix(strings.TrimPrefix(s, "0x"), "0X")
	if len(s)%2 != 0 {
		return nil, fmt.Errorf("odd number of hex digits (%d)", len(s))
	}
	b, err := hex.DecodeString(s)
	if err != nil {
		return nil, errors.New("not hexadecimal")
	}
	return b, nil
}

// quoteShort quotes a keyring field for an error message unless it could
// hold key material in the wrong field: fields longer than 32 characters or
// with a run of 8 or more hex digits are described by their length instead.
func quoteShort(s string) string {
	const limit, maxRun = 32, 8
	run, longest := 0, 0
	for _, r := range s {
		if isHexDigit(r) {
			run++
			longest = max(longest, run)
		} else {
			run = 0
		}
	}
	if len(s) <= limit && longest < maxRun {
		return strconv.Quote(s)
	}
	return fmt.Sprintf("(%d characters, not shown)", len(s))
}

func isHexDigit(r rune) bool {
	return '0' <= r && r <= '9' || 'a' <= r && r <= 'f' || 'A' <= r && r <= 'F'
}
