package wireguard

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// ErrCorruptKey is wrapped by [LoadOrCreateKey] when an existing key file
// does not hold exactly one base64-encoded 32-byte key. The file is never
// replaced automatically: replacing it would silently change the node's
// identity to its peers.
var ErrCorruptKey = errors.New("corrupt WireGuard key file")

// ErrInsecureKeyFile is wrapped by [LoadOrCreateKey] when an existing key file
// is not a regular file or is readable or writable by group or others.
var ErrInsecureKeyFile = errors.New("insecure WireGuard key file")

// keyFileMode is the mode of a key file LoadOrCreateKey writes.
const keyFileMode fs.FileMode = 0o600

// LoadOrCreateKey returns the WireGuard private key stored at path, creating
// it on first use.
//
// If path does not exist, a new private key is generated and written
// atomically (a temporary file in the same directory, fsync, then a
// no-clobber link into place and a directory fsync) as base64 followed by a
// newline with mode 0600; missing parent directories are created with mode
// 0700; created is true. If path exists it must be a regular file that
// group and others cannot access (else the error wraps [ErrInsecureKeyFile])
// holding exactly one base64-encoded non-zero 32-byte key, surrounding
// whitespace allowed (else the error wraps [ErrCorruptKey]). An existing file
// is never modified.
//
// The key is written to path and nowhere else. LoadOrCreateKey is safe to
// call concurrently, also from several processes: exactly one key wins.
func LoadOrCreateKey(path string) (key wgtypes.Key, created bool, err error) {
	key, err = loadKey(path)
	if err == nil {
		return key, false, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return wgtypes.Key{}, false, err
	}
	key, err = wgtypes.GeneratePrivateKey()
	if err != nil {
		return wgtypes.Key{}, false, fmt.Errorf("generate WireGuard key: %w", err)
	}
	switch err := writeKeyFile(path, key); {
	case err == nil:
		return key, true, nil
	case errors.Is(err, fs.ErrExist):
		// Another process created the file between our read and our link.
		key, err = loadKey(path)
		return key, false, err
	default:
		return wgtypes.Key{}, false, err
	}
}

// loadKey reads and checks an existing key file. The error wraps
// fs.ErrNotExist when path does not exist.
func loadKey(path string) (wgtypes.Key, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("read WireGuard key: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return wgtypes.Key{}, fmt.Errorf("read WireGuard key %s: %w: not a regular file (%s)", path, ErrInsecureKeyFile, fi.Mode().Type())
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return wgtypes.Key{}, fmt.Errorf("read WireGuard key %s: %w: mode %#o allows group/other access; run chmod 600 on it", path, ErrInsecureKeyFile, perm)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("read WireGuard key: %w", err)
	}
	key, err := parseKeyFile(data)
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("read WireGuard key %s: %w: %v; the key was NOT replaced: move the file away to generate a new key (peers must then learn the new public key)", path, ErrCorruptKey, err)
	}
	return key, nil
}

// maxKeyFileSize bounds what parseKeyFile accepts; a key file is 45 bytes.
const maxKeyFileSize = 1024

// parseKeyFile parses the contents of a key file: one base64 (standard
// encoding, padded) 32-byte non-zero key with optional surrounding
// whitespace.
func parseKeyFile(data []byte) (wgtypes.Key, error) {
	if len(data) > maxKeyFileSize {
		return wgtypes.Key{}, fmt.Errorf("file is %d bytes, a key file is 45", len(data))
	}
	s := bytes.TrimSpace(data)
	if len(s) == 0 {
		return wgtypes.Key{}, errors.New("file is empty")
	}
	if len(s) != base64.StdEncoding.EncodedLen(wgtypes.KeyLen) {
		return wgtypes.Key{}, fmt.Errorf("key is %d characters, want %d base64 characters", len(s), base64.StdEncoding.EncodedLen(wgtypes.KeyLen))
	}
	var raw [wgtypes.KeyLen + 2]byte
	n, err := base64.StdEncoding.Strict().Decode(raw[:], s)
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("invalid base64: %v", err)
	}
	if n != wgtypes.KeyLen {
		return wgtypes.Key{}, fmt.Errorf("key is %d bytes, want %d", n, wgtypes.KeyLen)
	}
	var key wgtypes.Key
	copy(key[:], raw[:n])
	if key == (wgtypes.Key{}) {
		return wgtypes.Key{}, errors.New("key is all zeros")
	}
	return key, nil
}

// formatKeyFile is the inverse of parseKeyFile.
func formatKeyFile(key wgtypes.Key) []byte {
	return []byte(key.String() + "\n")
}

// writeKeyFile writes key to path without ever replacing an existing file:
// the error wraps fs.ErrExist if path appeared meanwhile.
func writeKeyFile(path string, key wgtypes.Key) (err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create WireGuard key directory: %w", err)
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write WireGuard key: %w", err)
	}
	defer func() {
		// The temporary name is always removed: on success path is a second
		// link to the same inode.
		if rerr := os.Remove(tmp.Name()); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) && err == nil {
			err = fmt.Errorf("write WireGuard key: remove temporary file: %w", rerr)
		}
	}()
	if err := tmp.Chmod(keyFileMode); err != nil {
		tmp.Close()
		return fmt.Errorf("write WireGuard key: %w", err)
	}
	if _, err := tmp.Write(formatKeyFile(key)); err != nil {
		tmp.Close()
		return fmt.Errorf("write WireGuard key: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("write WireGuard key: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write WireGuard key: %w", err)
	}
	// link(2), unlike rename(2), fails if path exists, so two processes
	// starting at once cannot overwrite each other's key.
	if err := os.Link(tmp.Name(), path); err != nil {
		return fmt.Errorf("write WireGuard key: %w", err)
	}
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("write WireGuard key: %w", err)
	}
	return nil
}

// RotateKey replaces the private key at path with a new one and returns it.
// The new file is written as LoadOrCreateKey writes one (mode 0600, fsync)
// and renamed over the old one, so a crash leaves either key, never neither
// or a torn file. The previous key is gone from the disk afterwards.
func RotateKey(path string) (wgtypes.Key, error) {
	key, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("generate WireGuard key: %w", err)
	}
	next := path + ".next"
	_ = os.Remove(next) // a leftover of a crash between write and rename
	if err := writeKeyFile(next, key); err != nil {
		return wgtypes.Key{}, err
	}
	if err := os.Rename(next, path); err != nil {
		_ = os.Remove(next)
		return wgtypes.Key{}, fmt.Errorf("replace WireGuard key: %w", err)
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		return wgtypes.Key{}, fmt.Errorf("replace WireGuard key: %w", err)
	}
	return key, nil
}

// KeyCreated returns when the key file at path was written: the key's age
// is measured from it.
func KeyCreated(path string) (time.Time, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return time.Time{}, fmt.Errorf("stat WireGuard key: %w", err)
	}
	return fi.ModTime(), nil
}

// syncDir fsyncs a directory so that a new entry in it is durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// Fingerprint returns a short, stable, non-reversible identifier of a public
// key for logs and status: "sha256:" followed by the hex encoding of the
// first 8 bytes of the SHA-256 of the key.
func Fingerprint(pub wgtypes.Key) string {
	sum := sha256.Sum256(pub[:])
	return "sha256:" + hex.EncodeToString(sum[:8])
}
