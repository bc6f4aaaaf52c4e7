// Package testutil holds helpers shared by the project's privileged tests: a fresh network
// namespace per test and the root check. It is imported only from _test.go files.
package testutil

import (
	"os"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/meshcrypt/meshcrypt/internal/netnsutil"
)

// RequireRoot skips t when the test process is not root: privileged tests need CAP_NET_ADMIN
// and CAP_BPF. CI runs as root, where nothing skips.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN, CAP_BPF)")
	}
}

// NewNetNS creates an anonymous network namespace that lives until the test ends and returns
// a netlink handle bound to it. The calling thread's namespace is left unchanged.
func NewNetNS(t testing.TB) (netns.NsHandle, *netlink.Handle) {
	t.Helper()
	RequireRoot(t)
	var ns netns.NsHandle
	// netns.New moves the thread into the new namespace; OnLockedThread moves it back.
	err := netnsutil.OnLockedThread(func() error {
		var err error
		ns, err = netns.New()
		return err
	})
	if err != nil {
		if ns.IsOpen() {
			ns.Close()
		}
		t.Fatalf("create netns: %v", err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		t.Fatalf("netlink handle in netns: %v", err)
	}
	t.Cleanup(func() {
		h.Close()
		ns.Close()
	})
	return ns, h
}
