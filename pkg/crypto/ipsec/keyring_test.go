package ipsec

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// hexKey returns n bytes of recognisable material, as hex.
func hexKey(n int, seed byte) string {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i)
	}
	return fmt.Sprintf("%x", b)
}

type keyringTest struct {
	name    string
	in      string
	want    []string // Key.String() of each key, in SPI order
	wantErr string   // substring of the error; "" means success
}

var keyringTests = []keyringTest{
	{
		name: "one GCM key, default ICV",
		in:   "1 rfc4106(gcm(aes)) " + hexKey(20, 1) + "\n",
		want: []string{"spi=1 rfc4106(gcm(aes)) aes=128 icv=128"},
	},
	{
		name: "comments, blanks, tabs, 0x, upper case, ICV",
		in: "# meshcrypt keys\n\n   \n\t# indented comment\n" +
			"3\trfc4106(gcm(aes))\t0x" + strings.ToUpper(hexKey(36, 7)) + "\t96\n" +
			"  2 rfc4106(gcm(aes)) " + hexKey(28, 3) + " 128  \n",
		want: []string{"spi=2 rfc4106(gcm(aes)) aes=192 icv=128", "spi=3 rfc4106(gcm(aes)) aes=256 icv=96"},
	},
	{
		name: "CBC with HMAC and GCM, no trailing newline",
		in:   "15 cbc(aes)+hmac(sha256) " + hexKey(32, 9) + " " + hexKey(32, 40) + "\n1 rfc4106(gcm(aes)) " + hexKey(20, 1),
		want: []string{"spi=1 rfc4106(gcm(aes)) aes=128 icv=128", "spi=15 cbc(aes)+hmac(sha256) aes=256 icv=128"},
	},
	{
		name: "CRLF line endings",
		in:   "1 rfc4106(gcm(aes)) " + hexKey(20, 1) + "\r\n2 cbc(aes)+hmac(sha256) " + hexKey(16, 2) + " " + hexKey(32, 3) + "\r\n",
		want: []string{"spi=1 rfc4106(gcm(aes)) aes=128 icv=128", "spi=2 cbc(aes)+hmac(sha256) aes=128 icv=128"},
	},
	{name: "empty", in: "", wantErr: "keyring has no keys"},
	{name: "only comments", in: "# nothing\n\n", wantErr: "keyring has no keys"},
	{name: "SPI 0", in: "0 rfc4106(gcm(aes)) " + hexKey(20, 1), wantErr: `keyring line 1: SPI "0" is not a number from 1 to 15`},
	{name: "SPI 16", in: "16 rfc4106(gcm(aes)) " + hexKey(20, 1), wantErr: `line 1: SPI "16" is not a number from 1 to 15`},
	{name: "SPI negative", in: "-1 rfc4106(gcm(aes)) " + hexKey(20, 1), wantErr: `SPI "-1" is not a number`},
	{name: "SPI not a number", in: "x rfc4106(gcm(aes)) " + hexKey(20, 1), wantErr: `SPI "x" is not a number`},
	{
		name:    "duplicate SPI",
		in:      "2 rfc4106(gcm(aes)) " + hexKey(20, 1) + "\n# c\n2 rfc4106(gcm(aes)) " + hexKey(20, 2),
		wantErr: "keyring line 3: duplicate SPI 2 (first on line 1)",
	},
	{name: "unknown algorithm", in: "1 aes-gcm " + hexKey(20, 1), wantErr: `line 1: unknown algorithm "aes-gcm" (want rfc4106(gcm(aes)) or cbc(aes)+hmac(sha256))`},
	{name: "cbc without hmac", in: "1 cbc(aes) " + hexKey(16, 1), wantErr: `unknown algorithm "cbc(aes)"`},
	{name: "too few fields", in: "1 rfc4106(gcm(aes))", wantErr: "line 1: want SPI ALGORITHM KEY... (too few fields)"},
	{name: "GCM key too short", in: "1 rfc4106(gcm(aes)) " + hexKey(16, 1), wantErr: "rfc4106(gcm(aes)) key is 16 bytes, want 20, 28 or 36"},
	{name: "GCM key 19 bytes", in: "1 rfc4106(gcm(aes)) " + hexKey(19, 1), wantErr: "key is 19 bytes"},
	{name: "GCM key odd hex", in: "1 rfc4106(gcm(aes)) " + hexKey(20, 1)[1:], wantErr: "rfc4106(gcm(aes)) key: odd number of hex digits (39)"},
	{name: "GCM key not hex", in: "1 rfc4106(gcm(aes)) " + strings.Repeat("zz", 20), wantErr: "rfc4106(gcm(aes)) key: not hexadecimal"},
	{name: "GCM bad ICV", in: "1 rfc4106(gcm(aes)) " + hexKey(20, 1) + " 100", wantErr: "rfc4106(gcm(aes)) ICV of 100 bits, want 64, 96 or 128"},
	{name: "GCM ICV 0", in: "1 rfc4106(gcm(aes)) " + hexKey(20, 1) + " 0", wantErr: "ICV of -1 bits"},
	{name: "GCM ICV not a number", in: "1 rfc4106(gcm(aes)) " + hexKey(20, 1) + " big", wantErr: `ICV "big" is not a number of bits`},
	{name: "GCM extra field", in: "1 rfc4106(gcm(aes)) " + hexKey(20, 1) + " 128 x", wantErr: "want SPI rfc4106(gcm(aes)) KEY [ICV] (5 fields)"},
	{name: "CBC missing auth key", in: "1 cbc(aes)+hmac(sha256) " + hexKey(16, 1), wantErr: "want SPI cbc(aes)+hmac(sha256) ENCKEY AUTHKEY (3 fields)"},
	{name: "CBC enc key length", in: "1 cbc(aes)+hmac(sha256) " + hexKey(20, 1) + " " + hexKey(32, 1), wantErr: "encryption key is 20 bytes, want 16, 24 or 32"},
	{name: "CBC auth key length", in: "1 cbc(aes)+hmac(sha256) " + hexKey(16, 1) + " " + hexKey(20, 1), wantErr: "authentication key is 20 bytes, want 32"},
	{name: "CBC auth key not hex", in: "1 cbc(aes)+hmac(sha256) " + hexKey(16, 1) + " " + strings.Repeat("g", 64), wantErr: "authentication key: not hexadecimal"},
	{
		name:    "every bad line is reported",
		in:      "1 rfc4106(gcm(aes)) " + hexKey(20, 1) + "\n17 x y\n3 nope " + hexKey(20, 1) + "\n",
		wantErr: "keyring line 2: SPI \"17\" is not a number from 1 to 15\nkeyring line 3: unknown algorithm \"nope\"",
	},
	{
		name:    "key in the algorithm field is not echoed",
		in:      "1 " + hexKey(20, 1) + " 128",
		wantErr: "unknown algorithm (40 characters, not shown)",
	},
	{
		name:    "key in the SPI field is not echoed",
		in:      hexKey(20, 1) + " rfc4106(gcm(aes)) 1",
		wantErr: "SPI (40 characters, not shown) is not a number",
	},
}

func TestParseKeyring(t *testing.T) {
	for _, tt := range keyringTests {
		t.Run(tt.name, func(t *testing.T) {
			kr, err := ParseKeyring([]byte(tt.in))
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("ParseKeyring succeeded (%v), want error containing %q", kr, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %q does not contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseKeyring: %v", err)
			}
			var got []string
			for _, k := range kr.Keys() {
				got = append(got, k.String())
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("keys (-want +got):\n%s", diff)
			}
			// Encode round-trips.
			again, err := ParseKeyring(kr.Encode())
			if err != nil {
				t.Fatalf("parse encoded keyring: %v", err)
			}
			if !again.Equal(kr) {
				t.Errorf("encode/parse round trip changed the keyring: %v -> %v", kr, again)
			}
		})
	}
}

func TestKeyMaterialLayout(t *testing.T) {
	kr, err := ParseKeyring([]byte("1 cbc(aes)+hmac(sha256) " + hexKey(16, 1) + " " + hexKey(32, 100) + "\n2 rfc4106(gcm(aes)) " + hexKey(20, 50)))
	if err != nil {
		t.Fatal(err)
	}
	k1, _ := kr.Key(1)
	want := append(bytesOf(16, 1), bytesOf(32, 100)...)
	if !bytes.Equal(k1.material, want) {
		t.Errorf("CBC material = %x, want encryption key then authentication key %x", k1.material, want)
	}
	k2, _ := kr.Key(2)
	if !bytes.Equal(k2.material, bytesOf(20, 50)) {
		t.Errorf("GCM material = %x, want %x", k2.material, bytesOf(20, 50))
	}
	cur, ok := kr.Current()
	if !ok || cur.SPI() != 2 {
		t.Errorf("Current = %v, %v; want SPI 2 (the highest)", cur, ok)
	}
	if got := kr.SPIs(); !bytes.Equal(got, []byte{1, 2}) {
		t.Errorf("SPIs = %v", got)
	}
}

func bytesOf(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i)
	}
	return b
}

// TestKeyNeverPrinted checks that the material stays out of every format
// and log output.
func TestKeyNeverPrinted(t *testing.T) {
	k, err := GenerateKey(rand.Reader, 4, AESGCM)
	if err != nil {
		t.Fatal(err)
	}
	kr, err := NewKeyring(k)
	if err != nil {
		t.Fatal(err)
	}
	secret := fmt.Sprintf("%x", k.material)
	var logBuf bytes.Buffer
	slog.New(slog.NewTextHandler(&logBuf, nil)).Info("keys", "key", k, "keyring", kr)
	slog.New(slog.NewJSONHandler(&logBuf, nil)).Info("keys", "key", k, "keyring", kr)
	for _, s := range []string{
		fmt.Sprint(k), fmt.Sprintf("%v %+v %#v %s", k, k, k, k), fmt.Sprintf("%v %+v %#v", kr, kr, kr),
		fmt.Sprintf("%v %#v", []Key{k}, []Key{k}), logBuf.String(),
	} {
		if strings.Contains(s, secret) || strings.Contains(strings.ToUpper(s), strings.ToUpper(secret)) {
			t.Errorf("key material printed: %s", s)
		}
	}
	if !strings.Contains(string(kr.Encode()), secret) {
		t.Errorf("Encode lacks the material")
	}
}

func TestKeyringEdit(t *testing.T) {
	k1, err := GenerateKey(rand.Reader, 1, AESGCM)
	if err != nil {
		t.Fatal(err)
	}
	k2, err := GenerateKey(rand.Reader, 2, AESCBCHMACSHA256)
	if err != nil {
		t.Fatal(err)
	}
	kr, err := NewKeyring(k2, k1)
	if err != nil {
		t.Fatal(err)
	}
	if got := kr.SPIs(); !bytes.Equal(got, []byte{1, 2}) {
		t.Fatalf("SPIs = %v, want sorted [1 2]", got)
	}
	if _, err := kr.Add(k1); err == nil || !strings.Contains(err.Error(), "duplicate SPI 1") {
		t.Errorf("Add duplicate: %v", err)
	}
	if _, err := kr.Add(Key{}); err == nil {
		t.Errorf("Add zero key succeeded")
	}
	if got := kr.Remove(1).SPIs(); !bytes.Equal(got, []byte{2}) {
		t.Errorf("Remove(1) = %v", got)
	}
	if kr.Len() != 2 {
		t.Errorf("Remove changed the original keyring")
	}
	if k2.KeyBits() != 256 || k2.ICVBits() != 128 || k1.KeyBits() != 256 {
		t.Errorf("generated keys: %v %v", k1, k2)
	}
	if _, err := GenerateKey(rand.Reader, 1, "des"); err == nil {
		t.Errorf("GenerateKey with an unknown algorithm succeeded")
	}
	if _, err := NewKey(0, AESGCM, bytesOf(20, 1), 0); err == nil {
		t.Errorf("NewKey with SPI 0 succeeded")
	}
	if _, err := NewKey(1, AESCBCHMACSHA256, bytesOf(48, 1), 96); err == nil {
		t.Errorf("NewKey CBC with a 96-bit ICV succeeded")
	}
}

func TestFIPS(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := dir + "/" + name
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tt := range []struct {
		name string
		path string
		want bool
	}{
		{"enabled", write("on", "1\n"), true},
		{"disabled", write("off", "0\n"), false},
		{"garbage", write("garbage", "yes\n"), false},
		{"missing file", dir + "/missing", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := FIPSEnabled(tt.path); got != tt.want {
				t.Errorf("FIPSEnabled(%s) = %v, want %v", tt.path, got, tt.want)
			}
		})
	}
	_ = FIPSEnabled("") // the real file: whatever the host says, it must not panic

	for _, tt := range []struct {
		alg  Algorithm
		want bool
	}{
		{AESGCM, true}, {AESCBCHMACSHA256, true},
		{"rfc7539esp(chacha20,poly1305)", false}, {"cbc(des3_ede)+hmac(sha1)", false}, {"", false},
	} {
		if got := tt.alg.FIPSApproved(); got != tt.want {
			t.Errorf("%q.FIPSApproved() = %v, want %v", tt.alg, got, tt.want)
		}
	}

	kr, err := ParseKeyring([]byte("1 rfc4106(gcm(aes)) " + hexKey(36, 1) + "\n2 cbc(aes)+hmac(sha256) " + hexKey(32, 1) + " " + hexKey(32, 2)))
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckFIPS(kr); err != nil {
		t.Errorf("CheckFIPS of approved keys: %v", err)
	}
	short, err := ParseKeyring([]byte("1 rfc4106(gcm(aes)) " + hexKey(36, 1) + "\n3 rfc4106(gcm(aes)) " + hexKey(20, 1) + " 64"))
	if err != nil {
		t.Fatal(err)
	}
	err = CheckFIPS(short)
	if !errors.Is(err, ErrNotFIPSApproved) || !strings.Contains(err.Error(), "spi=3") || strings.Contains(err.Error(), "spi=1") {
		t.Errorf("CheckFIPS with a 64-bit ICV = %v, want ErrNotFIPSApproved naming only SPI 3", err)
	}
}

// FuzzParseKeyring checks that the parser never panics, that what it
// accepts round-trips through Encode, and that its errors never echo a
// field that could be key material.
func FuzzParseKeyring(f *testing.F) {
	for _, tt := range keyringTests {
		f.Add([]byte(tt.in))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		kr, err := ParseKeyring(data)
		if err != nil {
			if kr.Len() != 0 {
				t.Fatalf("error %v with a non-empty keyring", err)
			}
			// A run of 8 or more hex digits may be key material, whatever
			// field it is in: errors must never contain one from the input.
			for _, run := range hexRuns(string(data), 8) {
				if strings.Contains(err.Error(), run) {
					t.Fatalf("error %q echoes %q from the input", err, run)
				}
			}
			return
		}
		if kr.Len() == 0 || kr.Len() > MaxSPI {
			t.Fatalf("accepted keyring with %d keys", kr.Len())
		}
		for _, k := range kr.Keys() {
			if k.SPI() < MinSPI || k.SPI() > MaxSPI || !k.alg.FIPSApproved() {
				t.Fatalf("accepted key %v", k)
			}
		}
		again, err := ParseKeyring(kr.Encode())
		if err != nil || !again.Equal(kr) {
			t.Fatalf("round trip: %v, %v != %v", err, again, kr)
		}
	})
}

// hexRuns returns the maximal runs of at least n hex digits in s.
func hexRuns(s string, n int) []string {
	var out []string
	start := -1
	for i, r := range s + " " {
		switch {
		case isHexDigit(r) && start < 0:
			start = i
		case !isHexDigit(r) && start >= 0:
			if i-start >= n {
				out = append(out, s[start:i])
			}
			start = -1
		}
	}
	return out
}
