// Command meshcrypt-agent is the meshcrypt node agent. It runs on every node (a DaemonSet),
// publishes the node's MeshNode and keeps its WireGuard device and tunnel routes in step with
// the cluster. `meshcrypt-agent wireguard-device` is the long-lived userspace WireGuard device
// the agent starts when the kernel has no WireGuard.
package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/meshcrypt/meshcrypt/internal/logging"
	"github.com/meshcrypt/meshcrypt/pkg/agent"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
	"github.com/meshcrypt/meshcrypt/pkg/datapath"
	"github.com/meshcrypt/meshcrypt/pkg/metrics"
)

func main() {
	if err := newRootCmd().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "meshcrypt-agent:", err)
		os.Exit(1)
	}
}

type logFlags struct{ format, level string }

func (l *logFlags) register(cmd *cobra.Command) {
	cmd.PersistentFlags().StringVar(&l.format, "log-format", "text", "log format: text or json")
	cmd.PersistentFlags().StringVar(&l.level, "log-level", "info", "log level: debug, info, warn or error")
}

func newRootCmd() *cobra.Command {
	var (
		lf          logFlags
		kubeconfig  string
		opts        agent.Options
		backend     string
		attach      string
		clusterID   uint
		metricsAddr string
		underlayIPs []string
	)
	cmd := &cobra.Command{
		Use:           "meshcrypt-agent",
		Short:         "meshcrypt node agent: WireGuard keys, peers and tunnel routes for this node",
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := logging.New(os.Stderr, lf.format, lf.level)
			if err != nil {
				return err
			}
			opts.Logger = log
			if opts.WireGuard.Backend, err = wireguard.ParseBackend(backend); err != nil {
				return err
			}
			switch attach {
			case "auto":
				opts.AttachMode = datapath.AttachAuto
			case "tcx":
				opts.AttachMode = datapath.AttachTCX
			case "tc":
				opts.AttachMode = datapath.AttachTC
			default:
				return fmt.Errorf("--attach-mode %q: want auto, tcx or tc", attach)
			}
			if clusterID < 1 || clusterID > 255 {
				return fmt.Errorf("--cluster-id %d outside 1-255", clusterID)
			}
			opts.ClusterID = uint8(clusterID)
			for _, s := range underlayIPs {
				ip, err := netip.ParseAddr(s)
				if err != nil {
					return fmt.Errorf("--underlay-ip %q: %w", s, err)
				}
				opts.UnderlayIPs = append(opts.UnderlayIPs, ip)
			}
			// An empty --kubeconfig means in-cluster configuration.
			if opts.RESTConfig, err = clientcmd.BuildConfigFromFlags("", kubeconfig); err != nil {
				return fmt.Errorf("load kubeconfig: %w", err)
			}
			opts.RESTConfig.UserAgent = "meshcrypt-agent/" + opts.NodeName
			opts.Flows.ListenAddr = metricsAddr // /flows is served there
			a, err := agent.New(opts)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			g, ctx := errgroup.WithContext(ctx)
			if metricsAddr != "" {
				srv, err := metrics.NewServer(metrics.ServerOptions{Addr: metricsAddr, Gatherer: a.Gatherer(), Ready: a.Ready, Handlers: a.Handlers(), Logger: log})
				if err != nil {
					return err
				}
				g.Go(func() error { return srv.Run(ctx) })
			}
			g.Go(func() error {
				err := a.Run(ctx)
				stop() // the agent is done: stop the metrics server too
				return err
			})
			return g.Wait()
		},
	}
	lf.register(cmd)
	f := cmd.Flags()
	f.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster configuration)")
	f.StringVar(&opts.NodeName, "node-name", os.Getenv("NODE_NAME"), "this node's Kubernetes name (default $NODE_NAME)")
	f.StringVar(&opts.StateDir, "state-dir", "/var/lib/meshcrypt", "directory for the private key (mode 0600) and device logs")
	f.StringVar(&opts.WireGuard.Iface, "wireguard-iface", "meshcrypt0", "WireGuard device name (unique per host)")
	f.IntVar(&opts.WireGuard.ListenPort, "wireguard-port", agent.DefaultListenPort, "WireGuard UDP listen port")
	f.StringVar(&backend, "wireguard-backend", "auto", "WireGuard implementation: auto (kernel if available), kernel or userspace")
	f.StringSliceVar(&underlayIPs, "underlay-ip", nil, "underlay addresses (default: the Node's InternalIPs)")
	f.StringVar(&opts.BootIDPath, "boot-id-file", "/proc/sys/kernel/random/boot_id", "file holding this boot's ID")
	f.IntVar(&opts.RouteTable, "route-table", 0, "routing table for tunnel routes (default 28003)")
	f.IntVar(&opts.RulePriority, "rule-priority", 0, "priority of the rule that looks up the tunnel table (default 1000)")
	f.Uint32Var(&opts.FirewallMark, "firewall-mark", 0, "mark of the WireGuard device's own packets, which the tunnel table's rule skips (default 0x6d63)")
	f.DurationVar(&opts.ResyncPeriod, "resync-period", 0, "how often to re-apply the desired state (default 30s)")
	f.DurationVar(&opts.StatusPeriod, "status-period", 0, "how often to refresh peer handshakes in status (default 10s)")
	f.StringVar(&metricsAddr, "metrics-addr", fmt.Sprintf(":%d", metrics.DefaultPort), "listen address of /metrics, /healthz and /readyz (\"\" disables)")
	f.Uint32Var(&opts.Flows.Rate, "flow-rate", agent.DefaultFlowRate, "at most this many flow `events` per second and CPU, for drops and for sampled allowed packets each, while meshcrypt monitor watches (0 disables /flows)")
	f.Uint32Var(&opts.Flows.Sample, "flow-sample", agent.DefaultFlowSample, "report 1 in `N` allowed packets per CPU (and every TCP SYN) as flow events; 0 reports drops only")
	f.IntVar(&opts.ConntrackSize, "conntrack-size", datapath.DefaultConntrackSize, "connections the policy classifier tracks per node (an LRU; about 128 bytes of kernel memory each)")
	f.StringVar(&attach, "attach-mode", "auto", "how the policy classifier attaches to pod interfaces: auto (TCX, else tc), tcx or tc")
	f.StringVar(&opts.BPFPinDir, "bpf-pin-dir", "/sys/fs/bpf/meshcrypt", "bpffs directory where classifier maps and links are pinned (\"\" pins nothing)")
	f.StringVar(&opts.ClusterName, "cluster-name", "default", "this cluster's name, part of every identity")
	f.UintVar(&clusterID, "cluster-id", 1, "this cluster's ID (1-255), the high bits of every identity")
	f.DurationVar(&opts.IdentityGCGrace, "identity-gc-grace", 0, "how long an identity stays unused before it is deleted (default 10m)")
	f.DurationVar(&opts.IdentityGCInterval, "identity-gc-interval", 0, "how often unused identities are looked for (default 1m)")
	f.StringVar(&opts.Namespace, "namespace", envOr("POD_NAMESPACE", "meshcrypt"), "the agent's namespace: identity GC lease and IPsec keyring Secret (default $POD_NAMESPACE, else meshcrypt)")
	f.StringVar(&opts.FIPSPath, "fips-path", "/proc/sys/crypto/fips_enabled", "file holding the kernel's FIPS flag (1: refuse WireGuard and unapproved IPsec keys)")
	f.BoolVar(&opts.NoHealthEndpoint, "no-health-endpoint", false, "put no health endpoint (the highest address but one of each pod CIDR) on lo; meshcrypt verify then fails for this node")
	cmd.AddCommand(newDeviceCmd(&lf), newMountBPFFSCmd())
	return cmd
}

// newMountBPFFSCmd is the DaemonSet's init container: a bpffs on the host's /sys/fs/bpf, for
// hosts that do not mount one at boot.
func newMountBPFFSCmd() *cobra.Command {
	var path string
	cmd := &cobra.Command{
		Use:   "mount-bpffs",
		Short: "mount a bpffs at --path unless one is there (the DaemonSet's init container)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			mounted, err := datapath.MountBPFFS(path)
			if err != nil {
				return err
			}
			if mounted {
				fmt.Fprintf(cmd.OutOrStdout(), "mounted bpffs on %s\n", path)
			} else {
				fmt.Fprintf(cmd.OutOrStdout(), "%s is a bpffs already\n", path)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&path, "path", "/sys/fs/bpf", "directory to mount bpffs on")
	return cmd
}

func newDeviceCmd(lf *logFlags) *cobra.Command {
	var opts wireguard.RunOptions
	cmd := &cobra.Command{
		Use:   "wireguard-device",
		Short: "run the userspace WireGuard device (started by the agent; outlives agent restarts)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := logging.New(os.Stderr, lf.format, lf.level)
			if err != nil {
				return err
			}
			opts.Logger = log
			// SIGINT/SIGTERM end the device (and with it the tunnel); nothing else does.
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			signal.Ignore(syscall.SIGHUP, syscall.SIGPIPE)
			return wireguard.RunDevice(ctx, opts)
		},
	}
	cmd.Flags().StringVar(&opts.Name, "iface", "", "device name")
	cmd.Flags().IntVar(&opts.MTU, "mtu", wireguard.DefaultTunnelMTU, "device MTU")
	_ = cmd.MarkFlagRequired("iface")
	return cmd
}

// envOr returns the environment variable key, or def when it is unset or empty.
func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
