//go:build linux

package wireguard

import (
	"github.com/meshcrypt/meshcrypt/internal/netnsutil"

	"fmt"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// inNetNS runs fn on an OS thread that is in the network namespace at path
// ("" runs fn directly). Sockets fn creates and processes it starts belong to
// that namespace. The calling goroutine's thread is never moved.
func inNetNS(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	target, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open network namespace %s: %w", path, err)
	}
	defer target.Close()
	if err := netnsutil.Do(target, fn); err != nil {
		return fmt.Errorf("in network namespace %s: %w", path, err)
	}
	return nil
}

// openHandle opens an rtnetlink handle in the namespace at path ("" = the
// calling thread's).
func openHandle(path string) (*netlink.Handle, error) {
	if path == "" {
		h, err := netlink.NewHandle()
		if err != nil {
			return nil, fmt.Errorf("open netlink handle: %w", err)
		}
		return h, nil
	}
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open network namespace %s: %w", path, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("open netlink handle in %s: %w", path, err)
	}
	return h, nil
}
