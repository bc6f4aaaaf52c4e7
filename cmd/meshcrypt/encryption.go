package main

import (
	"context"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/status"
)

// modes maps the CLI's lowercase mode names to the API's.
var modes = map[string]v1alpha1.EncryptionMode{
	"wireguard": v1alpha1.ModeWireGuard,
	"ipsec":     v1alpha1.ModeIPsec,
}

// modeNames are the values --mode takes, sorted.
func modeNames() []string {
	return slices.Sorted(maps.Keys(modes))
}

func parseMode(s string) (v1alpha1.EncryptionMode, error) {
	if m, ok := modes[strings.ToLower(s)]; ok {
		return m, nil
	}
	valid := strings.Join(modeNames(), ", ")
	switch strings.ToLower(s) {
	case "disabled", "none", "off":
		return "", fmt.Errorf("--mode %s: to turn encryption off, use the `encryption disable` command (valid modes: %s)", s, valid)
	}
	return "", fmt.Errorf("--mode %q: unknown mode (valid modes: %s)", s, valid)
}

type waitFlags struct {
	wait    bool
	timeout time.Duration
}

func (w *waitFlags) register(cmd *cobra.Command) {
	cmd.Flags().BoolVar(&w.wait, "wait", false, "wait until every node has applied the change, showing per-node progress")
	cmd.Flags().DurationVar(&w.timeout, "timeout", 5*time.Minute, "how long --wait waits")
}

func newEncryptionCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "encryption",
		Short: "turn encryption of pod traffic between nodes on or off for the whole cluster",
	}
	var mode string
	var strict, nodeEnc bool
	var wf waitFlags
	enable := &cobra.Command{
		Use:   "enable --mode wireguard|ipsec [--strict] [--node-encryption] [--wait]",
		Short: "encrypt pod traffic between nodes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := parseMode(mode)
			if err != nil {
				return err
			}
			if nodeEnc && m != v1alpha1.ModeWireGuard {
				return fmt.Errorf("--node-encryption needs --mode wireguard: IPsec encrypts pod traffic only")
			}
			return setMode(cmd.Context(), g, cmd.OutOrStdout(), v1alpha1.EncryptionSpec{Mode: m, Strict: strict, NodeEncryption: nodeEnc}, wf)
		},
	}
	enable.Flags().StringVar(&mode, "mode", "", "encryption mode: "+strings.Join(modeNames(), ", "))
	_ = enable.RegisterFlagCompletionFunc("mode", cobra.FixedCompletions(modeNames(), cobra.ShellCompDirectiveNoFileComp))
	enable.Flags().BoolVar(&strict, "strict", false, "drop, never send in clear, pod traffic to nodes whose tunnel is not ready")
	enable.Flags().BoolVar(&nodeEnc, "node-encryption", false, "encrypt traffic between the nodes' own addresses too (mode wireguard; nodes matching MeshConfig nodeEncryptionOptOutLabels, by default control-plane nodes, opt out)")
	_ = enable.MarkFlagRequired("mode")
	wf.register(enable)
	var dwf waitFlags
	disable := &cobra.Command{
		Use:   "disable [--wait]",
		Short: "send pod traffic between nodes in clear (removes every tunnel)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return setMode(cmd.Context(), g, cmd.OutOrStdout(), v1alpha1.EncryptionSpec{Mode: v1alpha1.ModeDisabled}, dwf)
		},
	}
	dwf.register(disable)
	cmd.AddCommand(enable, disable)
	return cmd
}

// setMode writes the mode into the MeshConfig (creating it if needed) and, with --wait,
// follows every node until it has applied it.
func setMode(ctx context.Context, g *globals, out io.Writer, want v1alpha1.EncryptionSpec, wf waitFlags) error {
	mode := want.Mode
	c, err := g.client()
	if err != nil {
		return err
	}
	var previous v1alpha1.EncryptionMode
	var applied v1alpha1.EncryptionSpec
	by := whoAmI(ctx, g)
	change := ""
	err = updateMeshConfig(ctx, c, func(mc *v1alpha1.MeshConfig) error {
		previous = mc.Spec.Encryption.Mode
		if previous == "" { // none yet: agents treat a missing MeshConfig as Disabled
			previous = v1alpha1.ModeDisabled
		}
		change = fmt.Sprintf("encryption mode %s -> %s", previous, mode)
		if want.Strict {
			change += " (strict)"
		}
		if want.NodeEncryption {
			change += " (node encryption)"
		}
		mc.Spec.Encryption.Mode = mode
		mc.Spec.Encryption.Strict = want.Strict
		mc.Spec.Encryption.NodeEncryption = want.NodeEncryption
		applied = mc.Spec.Encryption
		if mc.Annotations == nil {
			mc.Annotations = map[string]string{}
		}
		mc.Annotations[v1alpha1.AnnotationChangedBy] = by
		mc.Annotations[v1alpha1.AnnotationChangedAt] = time.Now().UTC().Format(time.RFC3339)
		mc.Annotations[v1alpha1.AnnotationChange] = change
		return nil
	})
	if err != nil {
		return fmt.Errorf("set MeshConfig %s mode %s: %w", v1alpha1.MeshConfigName, mode, err)
	}
	fmt.Fprintln(out, change)
	recordChange(ctx, c, out, "EncryptionModeChanged", change+byWhom(by))
	if !wf.wait {
		return nil
	}
	return waitForMode(ctx, c, out, applied, wf.timeout)
}

// waitForMode polls the MeshNodes until every node has applied enc's mode, and announces
// node encryption exactly when enc asks it of the node, printing each node's progress when
// it changes.
func waitForMode(ctx context.Context, c client.Client, out io.Writer, enc v1alpha1.EncryptionSpec, timeout time.Duration) error {
	mode := enc.Mode
	return waitNodes(ctx, out, waitOptions{
		timeout: timeout,
		what:    "nodes to apply " + string(mode),
		poll: func(ctx context.Context) (map[string]string, error) {
			var list v1alpha1.MeshNodeList
			if err := c.List(ctx, &list); err != nil {
				return nil, fmt.Errorf("list MeshNodes: %w", err)
			}
			labels, err := nodeLabels(ctx, c)
			if err != nil {
				return nil, err
			}
			expected := slices.Sorted(maps.Keys(labels))
			lines := map[string]string{}
			for _, p := range status.Progress(mode, list.Items, expected) {
				lines[p.Node] = "waiting: " + p.Waiting
				if p.Done {
					lines[p.Node] = "done"
				}
			}
			for i := range list.Items {
				mn := &list.Items[i]
				if lines[mn.Name] != "done" {
					continue
				}
				if w := status.HostPending(&enc, mn, labels[mn.Name]); w != "" {
					lines[mn.Name] = "waiting: " + w
				}
			}
			return lines, nil
		},
		done: func(n int, took time.Duration) string {
			return fmt.Sprintf("all %d nodes applied %s in %s", n, mode, took.Round(time.Millisecond))
		},
		pending: func(done, total int) string { return fmt.Sprintf("%d of %d nodes applied %s", done, total, mode) },
	})
}

// waitOptions describe one --wait: what each node waits for, and how the end is told.
type waitOptions struct {
	timeout time.Duration
	// what is waited for, for an error while polling after the timeout.
	what string
	// poll returns each node's line: "done", or "waiting: " and what for.
	poll func(ctx context.Context) (map[string]string, error)
	// done is the last line once all nodes are done; pending the timeout's error with done
	// of total nodes done.
	done    func(nodes int, took time.Duration) string
	pending func(done, total int) string
}

// waitNodes polls until every node is done, printing each node's line when it changes.
func waitNodes(ctx context.Context, out io.Writer, o waitOptions) error {
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	start := time.Now()
	shown := map[string]string{}
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		lines, err := o.poll(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("timed out after %s waiting for %s", o.timeout, o.what)
			}
			return err
		}
		done := 0
		for _, n := range slices.Sorted(maps.Keys(lines)) {
			if lines[n] == "done" {
				done++
			}
			if shown[n] != lines[n] {
				shown[n] = lines[n]
				fmt.Fprintf(out, "  %-20s %s\n", n, lines[n])
			}
		}
		if done == len(lines) {
			fmt.Fprintln(out, o.done(done, time.Since(start)))
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("timed out after %s: %s", o.timeout, o.pending(done, len(lines)))
		case <-tick.C:
		}
	}
}
