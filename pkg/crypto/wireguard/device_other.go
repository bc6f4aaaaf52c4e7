//go:build !linux

package wireguard

import (
	"context"
	"fmt"
)

// Ensure is only implemented on Linux.
func Ensure(ctx context.Context, opts EnsureOptions) (Device, error) {
	return nil, fmt.Errorf("ensure WireGuard device %s: %w on this OS", opts.Name, ErrNotSupported)
}

// RunDevice is only implemented on Linux.
func RunDevice(ctx context.Context, opts RunOptions) error {
	return fmt.Errorf("run WireGuard device %s: %w on this OS", opts.Name, ErrNotSupported)
}

// DevicePID is only implemented on Linux.
func DevicePID(name string) (int, error) {
	return 0, fmt.Errorf("find WireGuard device %s: %w on this OS", name, ErrNotSupported)
}
