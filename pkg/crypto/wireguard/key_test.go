package wireguard

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// A fixed key for tables: base64 of 32 bytes 0x01..0x20.
const testKeyB64 = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="

var parseKeyFileTests = []struct {
	name    string
	in      string
	wantErr bool
}{
	{"canonical", testKeyB64 + "\n", false},
	{"no newline", testKeyB64, false},
	{"surrounding whitespace", " \t" + testKeyB64 + "\r\n\n", false},
	{"empty", "", true},
	{"only whitespace", " \n\t", true},
	{"garbage", "not a key at all, not a key at all, not a key\n", true},
	{"31 bytes", "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHw==\n", true},
	{"33 bytes", "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyAh\n", true},
	{"zero key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n", true},
	{"missing padding", strings.TrimSuffix(testKeyB64, "="), true},
	{"url encoding", strings.NewReplacer("+", "-", "/", "_").Replace("+/+/" + testKeyB64[4:]), true},
	{"non-canonical padding bits", testKeyB64[:42] + "B=", true},
	{"two keys", testKeyB64 + "\n" + testKeyB64 + "\n", true},
	{"inner space", testKeyB64[:20] + " " + testKeyB64[20:], true},
	{"huge", strings.Repeat(" ", 4096) + testKeyB64, true},
}

func TestParseKeyFile(t *testing.T) {
	want, err := wgtypes.ParseKey(testKeyB64)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range parseKeyFileTests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseKeyFile([]byte(tt.in))
			if tt.wantErr {
				if err == nil {
					t.Fatalf("parseKeyFile(%q) = %v, want error", tt.in, got)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseKeyFile(%q): %v", tt.in, err)
			}
			if got != want {
				t.Errorf("parseKeyFile(%q) = %v, want %v", tt.in, got, want)
			}
		})
	}
}

func FuzzParseKeyFile(f *testing.F) {
	for _, tt := range parseKeyFileTests {
		f.Add([]byte(tt.in))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		key, err := parseKeyFile(data)
		if err != nil {
			return
		}
		if key == (wgtypes.Key{}) {
			t.Fatalf("parseKeyFile(%q) accepted the zero key", data)
		}
		// Whatever parses is exactly one canonical key: it round-trips.
		if got := string(bytes.TrimSpace(data)); got != key.String() {
			t.Fatalf("parseKeyFile(%q) = %v, but the trimmed input %q is not its canonical encoding", data, key, got)
		}
		again, err := parseKeyFile(formatKeyFile(key))
		if err != nil || again != key {
			t.Fatalf("round trip of %v: %v, %v", key, again, err)
		}
	})
}

func TestLoadOrCreateKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state", "wireguard")
	path := filepath.Join(dir, "private.key")

	key, created, err := LoadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if !created {
		t.Error("first call: created = false, want true")
	}
	if key == (wgtypes.Key{}) {
		t.Fatal("zero key")
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode(); got != 0o600 {
		t.Errorf("key file mode = %v, want -rw-------", got)
	}
	di, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := di.Mode().Perm(); got != 0o700 {
		t.Errorf("key dir mode = %#o, want 0700", got)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if want := key.String() + "\n"; string(data) != want {
		t.Errorf("key file = %q, want %q", data, want)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Errorf("key dir holds %d entries, want only the key file (no temporary files left)", len(entries))
	}

	again, created, err := LoadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if created || again != key {
		t.Errorf("second call = (%v, created=%t), want the same key, created=false", again, created)
	}
}

func TestLoadOrCreateKeyConcurrent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "k", "private.key")
	const n = 8
	var (
		wg      sync.WaitGroup
		keys    [n]wgtypes.Key
		created [n]bool
		errs    [n]error
	)
	for i := range n {
		wg.Go(func() { keys[i], created[i], errs[i] = LoadOrCreateKey(path) })
	}
	wg.Wait()
	ncreated := 0
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("call %d: %v", i, errs[i])
		}
		if keys[i] != keys[0] {
			t.Errorf("call %d returned a different key", i)
		}
		if created[i] {
			ncreated++
		}
	}
	if ncreated != 1 {
		t.Errorf("%d calls created the key, want exactly 1", ncreated)
	}
}

func TestLoadOrCreateKeyRefuses(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(t *testing.T, path string)
		wantErr error
	}{
		{"corrupt", func(t *testing.T, path string) { writeFile(t, path, "garbage\n", 0o600) }, ErrCorruptKey},
		{"empty", func(t *testing.T, path string) { writeFile(t, path, "", 0o600) }, ErrCorruptKey},
		{"truncated", func(t *testing.T, path string) { writeFile(t, path, testKeyB64[:20], 0o600) }, ErrCorruptKey},
		{"group readable", func(t *testing.T, path string) { writeFile(t, path, testKeyB64+"\n", 0o640) }, ErrInsecureKeyFile},
		{"world readable", func(t *testing.T, path string) { writeFile(t, path, testKeyB64+"\n", 0o604) }, ErrInsecureKeyFile},
		{"symlink", func(t *testing.T, path string) {
			target := path + ".target"
			writeFile(t, target, testKeyB64+"\n", 0o600)
			if err := os.Symlink(target, path); err != nil {
				t.Fatal(err)
			}
		}, ErrInsecureKeyFile},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "private.key")
			tt.setup(t, path)
			before := snapshot(t, path)
			_, _, err := LoadOrCreateKey(path)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("LoadOrCreateKey = %v, want an error wrapping %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), path) {
				t.Errorf("error %q does not name the path", err)
			}
			if errors.Is(err, ErrCorruptKey) && !strings.Contains(err.Error(), "NOT replaced") {
				t.Errorf("error %q does not say the key was not replaced", err)
			}
			if after := snapshot(t, path); after != before {
				t.Errorf("key file changed: before %+v, after %+v", before, after)
			}
		})
	}
}

type fileSnapshot struct {
	data    string
	mode    os.FileMode
	modTime int64
}

func snapshot(t *testing.T, path string) fileSnapshot {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return fileSnapshot{string(data), fi.Mode(), fi.ModTime().UnixNano()}
}

func writeFile(t *testing.T, path, data string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // umask
		t.Fatal(err)
	}
}

func TestFingerprint(t *testing.T) {
	k, err := wgtypes.ParseKey(testKeyB64)
	if err != nil {
		t.Fatal(err)
	}
	got := Fingerprint(k)
	if !regexp.MustCompile(`^sha256:[0-9a-f]{16}$`).MatchString(got) {
		t.Fatalf("Fingerprint = %q, want sha256: and 16 hex digits", got)
	}
	// Stable across releases: status output and logs are compared over time.
	if want := "sha256:ae216c2ef5247a37"; got != want {
		t.Errorf("Fingerprint = %q, want %q", got, want)
	}
	if strings.Contains(got, k.String()[:8]) {
		t.Errorf("Fingerprint %q contains the key", got)
	}
	other := k
	other[0] ^= 1
	if Fingerprint(other) == got {
		t.Error("different keys have the same fingerprint")
	}
}

func TestRotateKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "wireguard.key")
	old, _, err := LoadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	before, err := KeyCreated(path)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond) // mtime granularity
	key, err := RotateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if key == old {
		t.Fatal("RotateKey returned the old key")
	}
	got, created, err := LoadOrCreateKey(path)
	if err != nil || created || got != key {
		t.Fatalf("after rotation the file holds %v (created %v, %v), want the new key", got == key, created, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("rotated key file mode %#o, want 0600", fi.Mode().Perm())
	}
	after, err := KeyCreated(path)
	if err != nil || !after.After(before) {
		t.Errorf("key created %v after rotation, was %v (%v)", after, before, err)
	}
	if matches, _ := filepath.Glob(filepath.Join(filepath.Dir(path), "*")); len(matches) != 1 {
		t.Errorf("files left beside the key: %v", matches)
	}
}
