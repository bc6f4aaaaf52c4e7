//go:build linux

package wireguard

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"golang.zx2c4.com/wireguard/tun"
)

// RunDevice is the body of the long-lived userspace WireGuard process (the
// agent's "wireguard-device" subcommand). It must run in a process whose
// threads are all in the node's network namespace: the TUN interface and
// wireguard-go's UDP sockets are created in the namespace of whichever
// thread runs that code.
//
// It claims the UAPI socket (failing if another live process serves the
// name), creates the TUN interface with the offloads the kernel allows
// (IFF_VNET_HDR with TSO/USO, GSO/GRO batching), starts a wireguard-go device
// on it and serves wgctrl requests on the socket. It returns nil when ctx is
// done or the process gets SIGTERM or SIGINT, and an error when the device
// or the socket fails; either way the socket file is removed and the TUN
// interface disappears with the device.
func RunDevice(ctx context.Context, opts RunOptions) error {
	if err := validateName(opts.Name); err != nil {
		return err
	}
	mtu := opts.MTU
	if mtu == 0 {
		mtu = device.DefaultMTU
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With(logKeyIface, opts.Name)
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	// Claim the socket first: a name clash then fails before a TUN
	// interface is created.
	uapiFile, err := ipc.UAPIOpen(opts.Name)
	if err != nil {
		return fmt.Errorf("run WireGuard device %s: open UAPI socket %s: %w", opts.Name, UAPISocketPath(opts.Name), err)
	}
	defer uapiFile.Close()
	removeSocket := func() {
		if err := os.Remove(UAPISocketPath(opts.Name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			log.Error("remove UAPI socket", "error", err)
		}
	}

	tdev, err := tun.CreateTUN(opts.Name, mtu)
	if err != nil {
		removeSocket()
		return fmt.Errorf("run WireGuard device %s: create TUN: %w", opts.Name, err)
	}
	log.Info("TUN device created", "mtu", mtu, "batch_size", tdev.BatchSize(), "offload", tdev.BatchSize() > 1, logKeyPID, os.Getpid())

	dev := device.NewDevice(tdev, conn.NewDefaultBind(), deviceLogger(log))
	defer dev.Close() // closes the TUN: the interface disappears

	uapi, err := ipc.UAPIListen(opts.Name, uapiFile)
	if err != nil {
		removeSocket()
		return fmt.Errorf("run WireGuard device %s: listen on UAPI socket: %w", opts.Name, err)
	}
	uapiErr := make(chan error, 1)
	go func() {
		for {
			c, err := uapi.Accept()
			if err != nil {
				uapiErr <- err
				return
			}
			go dev.IpcHandle(c)
		}
	}()
	log.Info("userspace WireGuard device running")

	var runErr error
	select {
	case <-ctx.Done():
		log.Info("stopping userspace WireGuard device", "reason", context.Cause(ctx))
	case err := <-uapiErr:
		runErr = fmt.Errorf("run WireGuard device %s: UAPI socket: %w", opts.Name, err)
	case <-dev.Wait():
		runErr = fmt.Errorf("run WireGuard device %s: device closed", opts.Name)
	}
	removeSocket()
	uapi.Close()
	return runErr
}

// deviceLogger adapts slog to wireguard-go's printf-style logger.
func deviceLogger(log *slog.Logger) *device.Logger {
	return &device.Logger{
		Verbosef: func(format string, args ...any) {
			if log.Enabled(context.Background(), slog.LevelDebug) {
				log.Debug(fmt.Sprintf(format, args...))
			}
		},
		Errorf: func(format string, args ...any) {
			log.Error(fmt.Sprintf(format, args...))
		},
	}
}
