package e2e

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshcrypt/meshcrypt/pkg/agent"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
)

// TestCorruptKeyFileStopsAgent: an agent whose state dir holds a key file that is not a key
// exits with a clear error and leaves the file as it was, rather than replacing the key.
func TestCorruptKeyFileStopsAgent(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := t.TempDir()
	bins, err := cluster.Binaries(ctx, "", dir)
	if err != nil {
		t.Fatal(err)
	}
	// No API server is needed: the key is checked before anything else.
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		content []byte
		mode    os.FileMode
		wantErr string
	}{
		{"not base64", []byte("this is not a key\n"), 0o600, "corrupt"},
		{"short key", []byte("c2hvcnQ=\n"), 0o600, "corrupt"},
		{"empty file", nil, 0o600, "corrupt"},
		{"readable by others", []byte("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n"), 0o644, "insecure"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			state := filepath.Join(t.TempDir(), "state")
			if err := os.MkdirAll(state, 0o700); err != nil {
				t.Fatal(err)
			}
			keyPath := filepath.Join(state, agent.KeyFileName)
			if err := os.WriteFile(keyPath, tt.content, tt.mode); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(keyPath, tt.mode); err != nil {
				t.Fatal(err)
			}
			cmd := exec.CommandContext(ctx, filepath.Join(bins, "meshcrypt-agent"),
				"--kubeconfig", kubeconfig, "--node-name", "n1", "--state-dir", state, "--wireguard-iface", "mcbadkey0")
			out, err := cmd.CombinedOutput()
			if err == nil {
				t.Fatalf("agent started with a bad key file:\n%s", out)
			}
			if !strings.Contains(string(out), tt.wantErr) || !strings.Contains(string(out), keyPath) {
				t.Fatalf("agent output does not name the problem (%q) and the file:\n%s", tt.wantErr, out)
			}
			after, err := os.ReadFile(keyPath)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(after, tt.content) {
				t.Fatalf("the key file was rewritten: %q -> %q", tt.content, after)
			}
			t.Logf("agent said: %s", strings.TrimSpace(string(out)))
		})
	}
}
