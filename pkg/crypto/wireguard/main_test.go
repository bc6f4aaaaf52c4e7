package wireguard_test

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"testing"

	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
)

// deviceSubcommand makes the test binary double as the userspace device
// process, like the agent's "wireguard-device" subcommand: Ensure's
// DeviceCommand re-executes the test binary with it.
const deviceSubcommand = "wireguard-device"

// agentSubcommand plays a short-lived agent: it ensures a userspace device
// (starting the device process), prints the device's pid and exits.
const agentSubcommand = "test-agent"

func TestMain(m *testing.M) {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case deviceSubcommand:
			os.Exit(runDeviceCommand(os.Args[2:]))
		case agentSubcommand:
			os.Exit(runAgentCommand(os.Args[2:]))
		}
	}
	os.Exit(m.Run())
}

func runDeviceCommand(args []string) int {
	fs := flag.NewFlagSet(deviceSubcommand, flag.ContinueOnError)
	iface := fs.String("iface", "", "interface name")
	mtu := fs.Int("mtu", 0, "MTU")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	if err := wireguard.RunDevice(context.Background(), wireguard.RunOptions{Name: *iface, MTU: *mtu, Logger: log}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func runAgentCommand(args []string) int {
	fs := flag.NewFlagSet(agentSubcommand, flag.ContinueOnError)
	iface := fs.String("iface", "", "interface name")
	mtu := fs.Int("mtu", 1420, "MTU")
	nsPath := fs.String("netns", "", "network namespace path")
	logPath := fs.String("log", "", "device log")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	d, err := wireguard.Ensure(context.Background(), wireguard.EnsureOptions{
		Name:          *iface,
		MTU:           *mtu,
		Backend:       wireguard.BackendUserspace,
		NetNS:         *nsPath,
		DeviceCommand: []string{exe, deviceSubcommand, "--iface", *iface, "--mtu", fmt.Sprint(*mtu)},
		LogPath:       *logPath,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer d.Close()
	pid, err := wireguard.DevicePID(*iface)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(pid)
	return 0
}
