// Package testutil holds helpers shared by the project's privileged tests: a fresh network
// namespace per test and the root check. It is imported only from _test.go files.
package testutil

import (
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
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
	type result struct {
		ns  netns.NsHandle
		err error
	}
	ch := make(chan result)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			ch <- result{err: err}
			runtime.UnlockOSThread()
			return
		}
		defer orig.Close()
		ns, err := netns.New()
		if err != nil {
			ch <- result{err: err}
			runtime.UnlockOSThread()
			return
		}
		if err := netns.Set(orig); err != nil {
			// The thread is stuck in the new namespace: let it die with the goroutine.
			ch <- result{ns: ns}
			return
		}
		runtime.UnlockOSThread()
		ch <- result{ns: ns}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatalf("create netns: %v", r.err)
	}
	h, err := netlink.NewHandleAt(r.ns)
	if err != nil {
		r.ns.Close()
		t.Fatalf("netlink handle in netns: %v", err)
	}
	t.Cleanup(func() {
		h.Close()
		r.ns.Close()
	})
	return r.ns, h
}
