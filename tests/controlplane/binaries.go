package controlplane

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Environment variables that point at the binaries.
const (
	// EnvKubeAPIServer names the kube-apiserver binary when Options.KubeAPIServer is empty.
	EnvKubeAPIServer = "MESHCRYPT_KUBE_APISERVER"
	// EnvEtcd names the etcd binary; empty means "etcd" on $PATH.
	EnvEtcd = "MESHCRYPT_ETCD"
)

// buildScript is the path, relative to the module root, of the script that builds and caches
// kube-apiserver and prints its path.
const buildScript = "hack/kube-apiserver.sh"

// findEtcd returns the etcd binary: $MESHCRYPT_ETCD, else etcd on $PATH.
func findEtcd() (string, error) {
	if p := os.Getenv(EnvEtcd); p != "" {
		if err := checkExecutable(p); err != nil {
			return "", fmt.Errorf("etcd from $%s: %w", EnvEtcd, err)
		}
		return p, nil
	}
	p, err := exec.LookPath("etcd")
	if err != nil {
		return "", fmt.Errorf("etcd not found: install Debian's etcd-server (make deps): %w", err)
	}
	return p, nil
}

// findKubeAPIServer returns the kube-apiserver binary: explicit, else $MESHCRYPT_KUBE_APISERVER,
// else whatever hack/kube-apiserver.sh of the module enclosing the working directory prints
// (it builds the binary on first use, which takes minutes; ctx bounds that).
func findKubeAPIServer(ctx context.Context, explicit string, log *slog.Logger) (string, error) {
	if explicit != "" {
		if err := checkExecutable(explicit); err != nil {
			return "", fmt.Errorf("kube-apiserver from options: %w", err)
		}
		return explicit, nil
	}
	if p := os.Getenv(EnvKubeAPIServer); p != "" {
		if err := checkExecutable(p); err != nil {
			return "", fmt.Errorf("kube-apiserver from $%s: %w", EnvKubeAPIServer, err)
		}
		return p, nil
	}
	wd, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find kube-apiserver: %w", err)
	}
	root, err := moduleRoot(wd)
	if err != nil {
		return "", fmt.Errorf("find kube-apiserver (set $%s or Options.KubeAPIServer): %w", EnvKubeAPIServer, err)
	}
	script := filepath.Join(root, buildScript)
	if err := checkExecutable(script); err != nil {
		return "", fmt.Errorf("find kube-apiserver (set $%s or Options.KubeAPIServer): %w", EnvKubeAPIServer, err)
	}
	// Test binaries of several packages run in parallel; let one of them build, the others
	// then find the cached binary.
	unlock, err := lockFile(ctx, filepath.Join(os.TempDir(), "meshcrypt-kube-apiserver-build.lock"))
	if err != nil {
		return "", fmt.Errorf("find kube-apiserver: %w", err)
	}
	defer unlock()
	log.Info("locating kube-apiserver", "script", script)
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, script)
	cmd.Dir = root
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("run %s: %w; stderr:\n%s", script, err, tail(stderr.Bytes(), 30))
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	p := strings.TrimSpace(lines[len(lines)-1])
	if err := checkExecutable(p); err != nil {
		return "", fmt.Errorf("%s printed %q: %w", script, p, err)
	}
	return p, nil
}

// moduleRoot walks up from dir to the directory holding go.mod.
func moduleRoot(dir string) (string, error) {
	for d := dir; ; {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		parent := filepath.Dir(d)
		if parent == d {
			return "", fmt.Errorf("no go.mod in %s or any parent", dir)
		}
		d = parent
	}
}

func checkExecutable(p string) error {
	st, err := os.Stat(p)
	if err != nil {
		return err
	}
	if st.IsDir() || st.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("%s is not an executable file", p)
	}
	return nil
}

// lockFile takes an exclusive flock on path, polling so ctx can cancel the wait.
func lockFile(ctx context.Context, path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock %s: %w", path, err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}
