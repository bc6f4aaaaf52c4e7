package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/flow"
)

// monitorTarget is one agent's flow stream.
type monitorTarget struct {
	node string // "" when given by address
	addr string // host:port
}

func (t monitorTarget) String() string {
	if t.node == "" {
		return t.addr
	}
	return t.node + " (" + t.addr + ")"
}

// monitorOptions are monitor's flags.
type monitorOptions struct {
	nodes      []string
	identities []string
	verdict    string
	output     string
	count      int
	timeout    time.Duration
	agents     []string
}

func newMonitorCmd(g *globals) *cobra.Command {
	var o monitorOptions
	cmd := &cobra.Command{
		Use:   "monitor",
		Short: "stream flow events from the agents: identities, verdicts, drop reasons, encryption",
		Long: `Streams the policy classifier's flow events from the agents, one line per event:

  TIME NODE DIRECTION SRC-IP:PORT IDENTITY(LABELS) -> DST-IP:PORT IDENTITY(LABELS) PROTO VERDICT REASON encrypted=yes|no [cross-node]

Every dropped packet is reported, up to the agents' rate limit; allowed packets are sampled
(every TCP SYN, and 1 in N others: the agent's --flow-sample). "lost N events" lines say what the rate
limit, a full ring buffer or a slow connection held back. -o json prints the agents' records
as JSON lines.

The CLI connects to each agent directly, at the address its MeshNode advertises
(status.monitorAddress, on the node network): run it where that network is reachable, or
forward an agent's port and name it with --agent. See docs/monitor.md.`,
		Example: `  meshcrypt monitor --verdict drop
  meshcrypt monitor --node worker-1 --identity app=db -o json
  meshcrypt monitor --identity 70123 --count 10 --timeout 30s`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runMonitor(cmd.Context(), g, o, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f := cmd.Flags()
	f.StringSliceVar(&o.nodes, "node", nil, "only these nodes' agents (default: every node)")
	f.StringArrayVar(&o.identities, "identity", nil, "only flows with an endpoint of this identity: a number or a label selector such as app=db,tier!=cache (repeatable: any matches)")
	f.StringVar(&o.verdict, "verdict", "", "only flows with this verdict: allow or drop")
	f.StringVarP(&o.output, "output", "o", "text", "output format: text or json (JSON lines)")
	f.IntVar(&o.count, "count", 0, "stop after this many flow events (0: no limit); with --timeout, exit 1 when fewer arrived")
	f.DurationVar(&o.timeout, "timeout", 0, "stop after this long (0: run until interrupted)")
	f.StringSliceVar(&o.agents, "agent", nil, "connect to these agent addresses (host:port) instead of those the MeshNodes advertise")
	return cmd
}

// runMonitor streams until ctx ends, the count is reached or the timeout passes.
func runMonitor(ctx context.Context, g *globals, o monitorOptions, stdout, stderr io.Writer) error {
	stderr = &lockedWriter{w: stderr} // every stream reports on it
	if o.output != "text" && o.output != "json" {
		return fmt.Errorf("-o %q: want text or json", o.output)
	}
	if o.count < 0 || o.timeout < 0 {
		return errors.New("--count and --timeout must not be negative")
	}
	var filter flow.Filter
	for _, s := range o.identities {
		if err := filter.AddIdentity(s); err != nil {
			return fmt.Errorf("--identity: %w", err)
		}
	}
	if o.verdict != "" {
		v, err := flow.ParseVerdict(o.verdict)
		if err != nil {
			return fmt.Errorf("--verdict: %w", err)
		}
		filter.Verdict = v
	}
	targets, err := monitorTargets(ctx, g, o, stderr)
	if err != nil {
		return err
	}

	if o.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.timeout)
		defer cancel()
	}
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	records := make(chan flow.Record, 64)
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		failed []error
	)
	hc := monitorHTTPClient()
	for _, t := range targets {
		wg.Go(func() {
			if err := streamAgent(ctx, hc, t, filter.Query(), records, stderr); err != nil {
				mu.Lock()
				failed = append(failed, err)
				mu.Unlock()
			}
		})
	}
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	defer func() {
		stop()
		<-done
	}()

	enc := json.NewEncoder(stdout)
	seen := 0
	for {
		select {
		case rec := <-records:
			if o.output == "json" {
				if err := enc.Encode(rec); err != nil {
					return err
				}
			} else if _, err := fmt.Fprintln(stdout, rec.Text()); err != nil {
				return err
			}
			if rec.Flow != nil {
				seen++
				if o.count > 0 && seen >= o.count {
					return nil
				}
			}
		case <-done:
			// Every stream has ended: each failed to connect, or ctx ended.
			if ctx.Err() == nil {
				return fmt.Errorf("no agent to stream from: %w", errors.Join(failed...))
			}
			return monitorEnd(o, seen, stderr)
		case <-ctx.Done():
			return monitorEnd(o, seen, stderr)
		}
	}
}

// monitorEnd is the result of a monitor that ran out of time: a negative verdict when it
// was asked for a count it did not see.
func monitorEnd(o monitorOptions, seen int, stderr io.Writer) error {
	if o.count > 0 && seen < o.count {
		fmt.Fprintf(stderr, "monitor: %d of %d flow events within %s\n", seen, o.count, o.timeout)
		return errVerdict
	}
	return nil
}

// monitorTargets are the agents to stream from: --agent, else every (--node) MeshNode that
// advertises a monitor address.
func monitorTargets(ctx context.Context, g *globals, o monitorOptions, stderr io.Writer) ([]monitorTarget, error) {
	if len(o.agents) > 0 {
		if len(o.nodes) > 0 {
			return nil, errors.New("--agent and --node exclude each other")
		}
		var out []monitorTarget
		for _, a := range o.agents {
			if _, _, err := net.SplitHostPort(a); err != nil {
				return nil, fmt.Errorf("--agent %q: want host:port: %w", a, err)
			}
			out = append(out, monitorTarget{addr: a})
		}
		return out, nil
	}
	c, err := g.client()
	if err != nil {
		return nil, err
	}
	var list v1alpha1.MeshNodeList
	if err := c.List(ctx, &list); err != nil {
		return nil, fmt.Errorf("list MeshNodes: %w", err)
	}
	var out []monitorTarget
	found := map[string]bool{}
	for _, mn := range list.Items {
		if len(o.nodes) > 0 && !slices.Contains(o.nodes, mn.Name) {
			continue
		}
		found[mn.Name] = true
		if mn.Status.MonitorAddress == "" {
			fmt.Fprintf(stderr, "monitor: node %s advertises no monitor address (its agent serves no flow events)\n", mn.Name)
			continue
		}
		out = append(out, monitorTarget{node: mn.Name, addr: mn.Status.MonitorAddress})
	}
	for _, n := range o.nodes {
		if !found[n] {
			return nil, fmt.Errorf("--node %s: no such MeshNode", n)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("no agent advertises a monitor address")
	}
	return out, nil
}

// monitorHTTPClient reaches agents directly (no proxy), with no overall timeout: streams are
// long.
func monitorHTTPClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		ResponseHeaderTimeout: 10 * time.Second,
	}}
}

// streamAgent streams one agent's records into out until ctx ends. A first connection that
// fails is an error; a stream that breaks later (an agent restart) is reconnected.
func streamAgent(ctx context.Context, hc *http.Client, t monitorTarget, q url.Values, out chan<- flow.Record, stderr io.Writer) error {
	connected := false
	backoff := time.Second
	for {
		err := streamOnce(ctx, hc, t, q, out, func() {
			connected = true
			backoff = time.Second
			fmt.Fprintf(stderr, "monitor: streaming from %s\n", t)
		})
		if ctx.Err() != nil {
			return nil
		}
		if !connected {
			return fmt.Errorf("%s: %w", t, err)
		}
		fmt.Fprintf(stderr, "monitor: %s: %v; reconnecting in %s\n", t, err, backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 10*time.Second)
	}
}

// streamOnce runs one connection to an agent, calling connected once the stream is open.
func streamOnce(ctx context.Context, hc *http.Client, t monitorTarget, q url.Values, out chan<- flow.Record, connected func()) error {
	u := url.URL{Scheme: "http", Host: t.addr, Path: flow.Path, RawQuery: q.Encode()}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return fmt.Errorf("%s: %s", resp.Status, strings.TrimSpace(string(b)))
	}
	connected()
	dec := json.NewDecoder(resp.Body)
	for {
		var rec flow.Record
		if err := dec.Decode(&rec); err != nil {
			if errors.Is(err, io.EOF) {
				return errors.New("the agent closed the stream")
			}
			return err
		}
		if rec.Node == "" {
			rec.Node = t.node
		}
		select {
		case out <- rec:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// lockedWriter serialises writes to w.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
