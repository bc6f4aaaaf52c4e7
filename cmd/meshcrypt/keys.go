package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/ipsec"
	"github.com/meshcrypt/meshcrypt/pkg/status"
)

// agentNamespace holds the IPsec keyring Secret.
const agentNamespace = "meshcrypt"

// Annotations the CLI puts on the keyring Secret when it rotates it, for the audit trail.
const (
	annotationRotatedAt = "meshcrypt.io/rotated-at"
	annotationRotatedBy = "meshcrypt.io/rotated-by"
)

func newKeysCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "keys",
		Short: "rotate the cluster's encryption keys and show their state",
	}
	var (
		node, namespace string
		all, force      bool
		every           time.Duration
		wf              waitFlags
	)
	rotate := &cobra.Command{
		Use:   "rotate [--node NAME | --all] [--wait] | --every DURATION",
		Short: "replace keys now (WireGuard: the nodes' keys; IPsec: a new keyring key), or schedule rotation",
		Long: `Replace keys now, or schedule automatic rotation.

In mode WireGuard (and Disabled) the named node (--node) or every node (--all) generates a new
private key, which never leaves the node, and publishes its public key; peers update at once.
In mode IPsec a new key with the next SPI is added to the keyring Secret meshcrypt-ipsec-keys:
every node installs it, switches its outbound traffic to it once every node has it, and drops
the old key after the grace period (no packet is lost). --wait follows every node until the
rotation is complete.

--every DURATION sets MeshConfig keyRotation.every: agents then rotate WireGuard keys older
than DURATION by themselves (0 turns it off).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			ctx, out := cmd.Context(), cmd.OutOrStdout()
			if cmd.Flags().Changed("every") {
				if node != "" || all {
					return errors.New("--every schedules rotation; it does not combine with --node or --all")
				}
				return setEvery(ctx, c, out, every, whoAmI(ctx, g))
			}
			var mc v1alpha1.MeshConfig
			if err := c.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc); err != nil && !apierrors.IsNotFound(err) {
				return fmt.Errorf("get MeshConfig: %w", err)
			}
			if mc.Spec.Encryption.Mode == v1alpha1.ModeIPsec {
				if node != "" {
					return errors.New("--node: in mode IPsec the keyring is the cluster's; rotate it with --all (or without flags)")
				}
				return rotateIPsec(ctx, g, c, out, namespace, force, wf)
			}
			if node == "" && !all {
				return errors.New("say which WireGuard keys to rotate: --node NAME or --all")
			}
			if node != "" && all {
				return errors.New("--node and --all exclude each other")
			}
			target := v1alpha1.AllNodes
			if node != "" {
				target = node
			}
			return rotateWireGuard(ctx, g, c, out, target, force, wf)
		},
	}
	rotate.Flags().StringVar(&node, "node", "", "rotate this node's WireGuard key")
	_ = rotate.RegisterFlagCompletionFunc("node", completeNodes(g))
	rotate.Flags().BoolVar(&all, "all", false, "rotate every node's WireGuard key (in mode IPsec: the keyring; the default there)")
	rotate.Flags().BoolVar(&force, "force", false, "request a rotation even while one is still running")
	rotate.Flags().DurationVar(&every, "every", 0, "rotate automatically at this age (e.g. 720h); 0 turns automatic rotation off")
	rotate.Flags().StringVar(&namespace, "namespace", agentNamespace, "the agents' namespace, which holds the IPsec keyring Secret")
	wf.register(rotate)

	var output string
	st := &cobra.Command{
		Use:   "status [-o table|json|yaml]",
		Short: "show every node's key fingerprint, key age, IPsec SPIs and any rotation in progress (never a key)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			r, err := readKeys(cmd.Context(), c)
			if err != nil {
				return err
			}
			return writeOutput(cmd.OutOrStdout(), output, r, r.WriteTable)
		},
	}
	addOutputFlag(st, &output)
	cmd.AddCommand(rotate, st)
	return cmd
}

// readKeys reads the MeshConfig and MeshNodes into a key report.
func readKeys(ctx context.Context, c client.Client) (status.KeysReport, error) {
	var mc v1alpha1.MeshConfig
	cfg := &mc
	if err := c.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc); apierrors.IsNotFound(err) {
		cfg = nil
	} else if err != nil {
		return status.KeysReport{}, fmt.Errorf("get MeshConfig: %w", err)
	}
	var list v1alpha1.MeshNodeList
	if err := c.List(ctx, &list); err != nil {
		return status.KeysReport{}, fmt.Errorf("list MeshNodes: %w", err)
	}
	return status.Keys(cfg, list.Items, time.Now()), nil
}

// whoAmI returns the caller's user name as the API server sees it ("" if it cannot tell).
func whoAmI(ctx context.Context, g *globals) string {
	cs, err := g.clientset()
	if err != nil {
		return ""
	}
	r, err := cs.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		return ""
	}
	return r.Status.UserInfo.Username
}

// updateMeshConfig applies change to the MeshConfig (created if missing), retrying on
// conflicts.
func updateMeshConfig(ctx context.Context, c client.Client, change func(*v1alpha1.MeshConfig) error) error {
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		var mc v1alpha1.MeshConfig
		err := c.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc)
		create := apierrors.IsNotFound(err)
		if err != nil && !create {
			return err
		}
		mc.Name = v1alpha1.MeshConfigName
		if err := change(&mc); err != nil {
			return err
		}
		if create {
			return c.Create(ctx, &mc)
		}
		return c.Update(ctx, &mc)
	})
}

// setEvery sets (or, with 0, clears) automatic rotation.
func setEvery(ctx context.Context, c client.Client, out io.Writer, every time.Duration, by string) error {
	if every < 0 {
		return fmt.Errorf("--every %s: must not be negative", every)
	}
	if every > 0 && every < time.Minute {
		return fmt.Errorf("--every %s: rotating more often than once a minute is not supported", every)
	}
	err := updateMeshConfig(ctx, c, func(mc *v1alpha1.MeshConfig) error {
		if mc.Spec.KeyRotation == nil {
			mc.Spec.KeyRotation = &v1alpha1.KeyRotationSpec{}
		}
		mc.Spec.KeyRotation.Every = nil
		if every > 0 {
			mc.Spec.KeyRotation.Every = &metav1.Duration{Duration: every}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("set MeshConfig keyRotation.every: %w", err)
	}
	msg := "automatic key rotation off"
	if every > 0 {
		msg = fmt.Sprintf("keys rotate automatically every %s", every)
	}
	fmt.Fprintln(out, msg)
	recordChange(ctx, c, out, "KeyRotationScheduled", msg+byWhom(by))
	return nil
}

// rotateWireGuard records a rotation request for target (a node or every node) and, with
// --wait, follows the nodes until each published a new key and every peer configured it.
func rotateWireGuard(ctx context.Context, g *globals, c client.Client, out io.Writer, target string, force bool, wf waitFlags) error {
	var list v1alpha1.MeshNodeList
	if err := c.List(ctx, &list); err != nil {
		return fmt.Errorf("list MeshNodes: %w", err)
	}
	before := map[string]string{}
	var names []string
	for _, mn := range list.Items {
		names = append(names, mn.Name)
		if mn.Spec.WireGuard != nil && (target == v1alpha1.AllNodes || target == mn.Name) {
			before[mn.Name] = mn.Spec.WireGuard.PublicKey
		}
	}
	if target != v1alpha1.AllNodes && !slices.Contains(names, target) {
		return nodeNotFound(target, names)
	}
	by := whoAmI(ctx, g)
	now := time.Now()
	err := updateMeshConfig(ctx, c, func(mc *v1alpha1.MeshConfig) error {
		kr := mc.Spec.KeyRotation
		if kr == nil {
			kr = &v1alpha1.KeyRotationSpec{}
			mc.Spec.KeyRotation = kr
		}
		if !force {
			var running []string
			for i := range list.Items {
				if p := status.PendingRotation(&list.Items[i], kr, now); p != "" && (target == v1alpha1.AllNodes || target == list.Items[i].Name) {
					running = append(running, list.Items[i].Name+" ("+p+")")
				}
			}
			if len(running) > 0 {
				return &rotationRunningError{nodes: running}
			}
		}
		req := v1alpha1.RotationRequest{Node: target, RequestedAt: metav1.NewMicroTime(now), RequestedBy: by}
		kept := kr.Requests[:0]
		for _, r := range kr.Requests {
			// A request for every node supersedes the older per-node ones.
			if r.Node != target && (target != v1alpha1.AllNodes || r.RequestedAt.After(now)) {
				kept = append(kept, r)
			}
		}
		kr.Requests = append(kept, req)
		return nil
	})
	var running *rotationRunningError
	if errors.As(err, &running) {
		return err
	}
	if err != nil {
		return fmt.Errorf("request WireGuard key rotation in MeshConfig: %w", err)
	}
	what := "every node's WireGuard key"
	if target != v1alpha1.AllNodes {
		what = "node " + target + "'s WireGuard key"
	}
	fmt.Fprintf(out, "rotation of %s requested\n", what)
	recordChange(ctx, c, out, "KeyRotationRequested", "rotation of "+what+" requested"+byWhom(by))
	if !wf.wait {
		return nil
	}
	return waitForNodes(ctx, c, out, wf.timeout, "rotation", func(mns []v1alpha1.MeshNode) map[string]string {
		return wireGuardRotationProgress(mns, before)
	})
}

// rotationRunningError refuses a second rotation while the first is still running.
type rotationRunningError struct{ nodes []string }

func (e *rotationRunningError) Error() string {
	return fmt.Sprintf("a rotation is still running: %s have not replaced their key yet; wait for it (keys status) or use --force",
		strings.Join(e.nodes, ", "))
}

// wireGuardRotationProgress says, for every node whose key was before[node], whether it has
// published a new one and every other node configured it ("done"), or what it waits for.
func wireGuardRotationProgress(mns []v1alpha1.MeshNode, before map[string]string) map[string]string {
	out := map[string]string{}
	for _, mn := range mns {
		old, ok := before[mn.Name]
		if !ok {
			continue
		}
		if mn.Spec.WireGuard == nil || mn.Spec.WireGuard.PublicKey == old {
			out[mn.Name] = "waiting: new key not published yet"
			continue
		}
		key := mn.Spec.WireGuard.PublicKey
		var missing []string
		for _, o := range mns {
			if o.Name == mn.Name || o.Status.Mode != v1alpha1.ModeWireGuard {
				continue
			}
			has := slices.ContainsFunc(o.Status.Peers, func(p v1alpha1.PeerStatus) bool { return p.Node == mn.Name && p.PublicKey == key })
			if !has {
				missing = append(missing, o.Name)
			}
		}
		if len(missing) > 0 {
			out[mn.Name] = "waiting: new key not configured on " + strings.Join(missing, ", ")
			continue
		}
		out[mn.Name] = "done"
	}
	return out
}

// rotateIPsec adds a key with the next SPI to the keyring Secret and, with --wait, follows
// every node until it encrypts with it and the old key is gone.
func rotateIPsec(ctx context.Context, g *globals, c client.Client, out io.Writer, namespace string, force bool, wf waitFlags) error {
	var list v1alpha1.MeshNodeList
	if err := c.List(ctx, &list); err != nil {
		return fmt.Errorf("list MeshNodes: %w", err)
	}
	if r := status.IPsecRotation(list.Items); r != "" && !force {
		return fmt.Errorf("an IPsec rotation is still running (%s); wait for it (keys status) or use --force", r)
	}
	by := whoAmI(ctx, g)
	var next uint8
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		var sec corev1.Secret
		if err := c.Get(ctx, client.ObjectKey{Namespace: namespace, Name: ipsec.SecretName}, &sec); err != nil {
			if apierrors.IsNotFound(err) {
				return fmt.Errorf("keyring Secret %s/%s not found: create it first (see docs/ipsec.md)", namespace, ipsec.SecretName)
			}
			return fmt.Errorf("get keyring Secret: %w", err)
		}
		kr, err := ipsec.ParseKeyring(sec.Data[ipsec.SecretKey])
		if err != nil {
			return fmt.Errorf("keyring Secret %s/%s: %w", namespace, ipsec.SecretName, err)
		}
		nk, err := nextKeyring(kr)
		if err != nil {
			return err
		}
		cur, _ := nk.Current()
		next = cur.SPI()
		sec.Data[ipsec.SecretKey] = nk.Encode()
		if sec.Annotations == nil {
			sec.Annotations = map[string]string{}
		}
		sec.Annotations[annotationRotatedAt] = time.Now().UTC().Format(time.RFC3339)
		sec.Annotations[annotationRotatedBy] = by
		return c.Update(ctx, &sec)
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "IPsec key with SPI %d added to %s/%s; nodes switch to it once every node has installed it\n", next, namespace, ipsec.SecretName)
	recordChange(ctx, c, out, "KeyRotationRequested", fmt.Sprintf("IPsec key with SPI %d added to the keyring%s", next, byWhom(by)))
	if !wf.wait {
		return nil
	}
	return waitForNodes(ctx, c, out, wf.timeout, "IPsec rotation", func(mns []v1alpha1.MeshNode) map[string]string {
		return ipsecRotationProgress(mns, next)
	})
}

// nextKeyring returns kr's current key and a new one with the next SPI, of the same
// algorithm; older keys (already retired by the nodes) are dropped.
func nextKeyring(kr ipsec.Keyring) (ipsec.Keyring, error) {
	cur, ok := kr.Current()
	if !ok {
		return ipsec.Keyring{}, errors.New("the keyring is empty")
	}
	if cur.SPI() >= ipsec.MaxSPI {
		return ipsec.Keyring{}, fmt.Errorf("the current key has SPI %d, the last one: the SPI cannot wrap while it is in use; "+
			"replace the keyring with one key of SPI 1 during a maintenance window (traffic between nodes pauses until every node has it)", cur.SPI())
	}
	nk, err := ipsec.GenerateKey(rand.Reader, cur.SPI()+1, cur.Algorithm())
	if err != nil {
		return ipsec.Keyring{}, err
	}
	return ipsec.NewKeyring(cur, nk)
}

// ipsecRotationProgress says, for every IPsec node, whether it encrypts with spi and holds
// no other key ("done"), or what it waits for.
func ipsecRotationProgress(mns []v1alpha1.MeshNode, spi uint8) map[string]string {
	out := map[string]string{}
	for _, mn := range mns {
		if mn.Spec.IPsec == nil {
			continue
		}
		var outSPI int32
		if mn.Status.IPsec != nil {
			outSPI = mn.Status.IPsec.OutboundSPI
		}
		switch {
		case !slices.Contains(mn.Spec.IPsec.SPIs, int32(spi)):
			out[mn.Name] = fmt.Sprintf("waiting: SPI %d not installed yet", spi)
		case outSPI != int32(spi):
			out[mn.Name] = fmt.Sprintf("waiting: installed, still encrypting with SPI %d until every node has %d", outSPI, spi)
		case len(mn.Spec.IPsec.SPIs) != 1:
			out[mn.Name] = fmt.Sprintf("waiting: encrypting with SPI %d, old keys %v go after the grace period", spi, mn.Spec.IPsec.SPIs)
		default:
			out[mn.Name] = "done"
		}
	}
	return out
}

// waitForNodes follows a rotation: progress says, for every node concerned, "done" or what
// it waits for.
func waitForNodes(ctx context.Context, c client.Client, out io.Writer, timeout time.Duration, what string, progress func([]v1alpha1.MeshNode) map[string]string) error {
	return waitNodes(ctx, out, waitOptions{
		timeout: timeout,
		what:    "the " + what,
		poll: func(ctx context.Context) (map[string]string, error) {
			var list v1alpha1.MeshNodeList
			if err := c.List(ctx, &list); err != nil {
				return nil, fmt.Errorf("list MeshNodes: %w", err)
			}
			return progress(list.Items), nil
		},
		done: func(n int, took time.Duration) string {
			return fmt.Sprintf("%s complete on all %d nodes in %s", what, n, took.Round(time.Millisecond))
		},
		pending: func(done, total int) string { return fmt.Sprintf("%s complete on %d of %d nodes", what, done, total) },
	})
}
