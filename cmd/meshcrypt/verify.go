package main

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

// verifyOptions are the flags of meshcrypt verify.
type verifyOptions struct {
	from, to string
	allPairs bool
	probes   int32
	timeout  time.Duration
	output   string
	host     bool
}

func newVerifyCmd(g *globals) *cobra.Command {
	var o verifyOptions
	cmd := &cobra.Command{
		Use:   "verify (--from NODE --to NODE | --all-pairs) [--host] [--probes N] [-o table|json|yaml]",
		Short: "prove, with marker packets between nodes and captures of their underlay, that traffic between them is encrypted",
		Long: `Prove that traffic between nodes is encrypted, actively.

verify creates a MeshVerification: for each pair the agent on the first node sends UDP probes
carrying a random marker from its health endpoint (an address of its pod CIDR) to the second
node's, which echoes them; both agents capture the packets they put on their underlay and
look for the marker. The verdict of a pair is Encrypted when probes and echoes crossed and no
underlay packet carried the marker, PlaintextSeen when one did, Failed when the proof could not
be made (an agent did not answer, nothing arrived). The MeshVerification stays as the audit
record: time, nodes, cipher, counts and verdict of every pair.

With --host the probes go between the nodes' own underlay addresses instead: the proof of
host traffic, which is encrypted only with node encryption (encryption enable
--node-encryption); a node that opts out shows PlaintextSeen, as it should.

Exit status: 0 when every pair is Encrypted, 1 when any pair is not, 2 on errors.`,
		Example: `  meshcrypt verify --from node-a --to node-b
  meshcrypt verify --all-pairs -o yaml`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(o.output); err != nil {
				return err
			}
			if o.allPairs == (o.from != "" || o.to != "") {
				return errors.New("say which nodes to verify: --from NODE --to NODE, or --all-pairs")
			}
			if !o.allPairs && (o.from == "" || o.to == "" || o.from == o.to) {
				return errors.New("--from and --to name two different nodes")
			}
			if o.probes < 1 || o.probes > 100 {
				return fmt.Errorf("--probes %d: want 1-100", o.probes)
			}
			return runVerify(cmd.Context(), g, cmd.OutOrStdout(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.from, "from", "", "the node that sends the probes")
	f.StringVar(&o.to, "to", "", "the node that echoes them")
	f.BoolVar(&o.allPairs, "all-pairs", false, "verify every pair of nodes")
	f.BoolVar(&o.host, "host", false, "prove host traffic (between the nodes' underlay addresses) instead of pod traffic")
	f.Int32Var(&o.probes, "probes", 10, "probes per pair (1-100)")
	f.DurationVar(&o.timeout, "timeout", 2*time.Minute, "how long to wait for every pair's verdict")
	_ = cmd.RegisterFlagCompletionFunc("from", completeNodes(g))
	_ = cmd.RegisterFlagCompletionFunc("to", completeNodes(g))
	addOutputFlag(cmd, &o.output)
	return cmd
}

// verifyPairs returns the pairs to verify among the nodes: from-to, or one per unordered
// pair (probes and echoes cross both ways).
func verifyPairs(nodes []string, o verifyOptions) ([]v1alpha1.VerificationPair, error) {
	sort.Strings(nodes)
	if !o.allPairs {
		for _, n := range []string{o.from, o.to} {
			if !slices.Contains(nodes, n) {
				return nil, nodeNotFound(n, nodes)
			}
		}
		return []v1alpha1.VerificationPair{{From: o.from, To: o.to}}, nil
	}
	if len(nodes) < 2 {
		return nil, fmt.Errorf("--all-pairs needs two nodes with an agent; the cluster has %d", len(nodes))
	}
	var out []v1alpha1.VerificationPair
	for i := range nodes {
		for j := i + 1; j < len(nodes); j++ {
			out = append(out, v1alpha1.VerificationPair{From: nodes[i], To: nodes[j]})
		}
	}
	return out, nil
}

func runVerify(ctx context.Context, g *globals, out io.Writer, o verifyOptions) error {
	c, err := g.client()
	if err != nil {
		return err
	}
	var list v1alpha1.MeshNodeList
	if err := c.List(ctx, &list); err != nil {
		return fmt.Errorf("list MeshNodes: %w", err)
	}
	var names []string
	for _, mn := range list.Items {
		names = append(names, mn.Name)
	}
	pairs, err := verifyPairs(names, o)
	if err != nil {
		return err
	}
	var rnd [12]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return err
	}
	mv := &v1alpha1.MeshVerification{
		ObjectMeta: metav1.ObjectMeta{Name: "verify-" + time.Now().UTC().Format("20060102-150405") + "-" + hex.EncodeToString(rnd[:2])},
		Spec: v1alpha1.MeshVerificationSpec{Pairs: pairs, Marker: "mcv-" + hex.EncodeToString(rnd[2:]),
			Probes: o.probes, RequestedBy: whoAmI(ctx, g), Target: v1alpha1.TargetPods},
	}
	if o.host {
		mv.Spec.Target = v1alpha1.TargetHosts
	}
	if err := c.Create(ctx, mv); err != nil {
		return fmt.Errorf("create MeshVerification: %w", err)
	}
	if o.output == "table" {
		fmt.Fprintf(out, "MeshVerification %s: %d pair(s), marker %s\n", mv.Name, len(pairs), mv.Spec.Marker)
	}
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	for !verificationComplete(mv) {
		select {
		case <-ctx.Done():
			return verifyResult(context.Background(), c, out, mv, o.output, fmt.Sprintf("timed out after %s", o.timeout))
		case <-time.After(500 * time.Millisecond):
		}
		if err := c.Get(ctx, client.ObjectKeyFromObject(mv), mv); err != nil && ctx.Err() == nil {
			return fmt.Errorf("get MeshVerification %s: %w", mv.Name, err)
		}
	}
	return verifyResult(ctx, c, out, mv, o.output, "")
}

// verificationComplete reports whether every pair has its verdict.
func verificationComplete(mv *v1alpha1.MeshVerification) bool {
	done := 0
	for _, r := range mv.Status.Results {
		if r.Phase == v1alpha1.PhaseComplete {
			done++
		}
	}
	return done == len(mv.Spec.Pairs)
}

// verifyResult records the summary in the MeshVerification's status (best effort), prints
// the result and returns errVerdict unless every pair is Encrypted.
func verifyResult(ctx context.Context, c client.Client, out io.Writer, mv *v1alpha1.MeshVerification, format, incomplete string) error {
	summary, ok := verifySummary(mv, incomplete)
	patch := client.MergeFrom(mv.DeepCopy())
	mv.Status.Pairs, mv.Status.Encrypted = int32(len(mv.Spec.Pairs)), 0
	for _, r := range mv.Status.Results {
		if r.Verdict == v1alpha1.VerdictEncrypted {
			mv.Status.Encrypted++
		}
	}
	if err := c.Status().Patch(ctx, mv, patch); err != nil && !apierrors.IsNotFound(err) && format == "table" {
		fmt.Fprintf(out, "warning: summary not recorded in %s: %s\n", mv.Name, describe(err))
	}
	if err := writeOutput(out, format, mv, func(w io.Writer) error {
		fmt.Fprintln(w, summary)
		return writeVerifyTable(w, mv)
	}); err != nil {
		return err
	}
	if !ok {
		return errVerdict
	}
	return nil
}

// verifySummary is the verdict line: every pair encrypted, or how many are not and why.
func verifySummary(mv *v1alpha1.MeshVerification, incomplete string) (string, bool) {
	n := len(mv.Spec.Pairs)
	what := "node pair(s)"
	if mv.Spec.Target == v1alpha1.TargetHosts {
		what = "node pair(s)' host traffic"
	}
	var enc, plain, failed int
	ciphers := map[string]bool{}
	for _, r := range mv.Status.Results {
		switch r.Verdict {
		case v1alpha1.VerdictEncrypted:
			enc++
			ciphers[string(r.Mode)+", "+r.Cipher] = true
		case v1alpha1.VerdictPlaintextSeen:
			plain++
		case v1alpha1.VerdictFailed:
			failed++
		}
	}
	if enc == n {
		var cs []string
		for c := range ciphers {
			cs = append(cs, c)
		}
		sort.Strings(cs)
		return fmt.Sprintf("verified: all %d %s encrypted (%s); no underlay packet carried the marker", n, what, strings.Join(cs, "; ")), true
	}
	var why []string
	if plain > 0 {
		why = append(why, fmt.Sprintf("%d with the marker in clear on the underlay", plain))
	}
	if failed > 0 {
		why = append(why, fmt.Sprintf("%d could not be proven", failed))
	}
	if rest := n - enc - plain - failed; rest > 0 {
		why = append(why, fmt.Sprintf("%d without a verdict (%s)", rest, cmp.Or(incomplete, "still running")))
	}
	word := "NOT VERIFIED"
	if plain > 0 {
		word = "PLAINTEXT SEEN"
	}
	return fmt.Sprintf("%s: %d of %d %s encrypted; %s", word, enc, n, what, strings.Join(why, ", ")), false
}

// writeVerifyTable prints one line per pair.
func writeVerifyTable(w io.Writer, mv *v1alpha1.MeshVerification) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FROM\tTO\tVERDICT\tMODE\tCIPHER\tPROBES\tECHOES\tFRAMES\tENCRYPTED\tMARKER IN CLEAR\tMESSAGE")
	for _, p := range mv.Spec.Pairs {
		var r *v1alpha1.VerificationResult
		for i := range mv.Status.Results {
			if mv.Status.Results[i].From == p.From && mv.Status.Results[i].To == p.To {
				r = &mv.Status.Results[i]
			}
		}
		if r == nil || r.Phase != v1alpha1.PhaseComplete {
			fmt.Fprintf(tw, "%s\t%s\t-\t\t\t\t\t\t\t\tno verdict\n", p.From, p.To)
			continue
		}
		var frames, encrypted, clear int32
		for _, c := range []*v1alpha1.CaptureResult{r.Source, r.Destination} {
			if c != nil {
				frames, encrypted, clear = frames+c.Frames, encrypted+c.EncryptedFrames, clear+c.PlaintextFrames
			}
		}
		received := int32(0)
		if r.Destination != nil {
			received = r.Destination.ProbesReceived
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d/%d\t%d\t%d\t%d\t%d\t%s\n", p.From, p.To, r.Verdict, r.Mode, r.Cipher,
			received, r.ProbesSent, r.EchoesReceived, frames, encrypted, clear, r.Message)
	}
	return tw.Flush()
}
