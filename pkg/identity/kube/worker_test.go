package kube

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/cache"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
	"github.com/meshcrypt/meshcrypt/pkg/identity/identitytest"
)

// workerConfig is what a worker process is told on its command line.
type workerConfig struct {
	Server, CAFile, Token string
	ClusterID             uint8
	ClusterName           string
	Sets, Space           int
	Seed                  uint64
	Watch                 bool
	Goroutines            int
}

func (c workerConfig) args() []string {
	return []string{
		workerSubcommand,
		"--server=" + c.Server, "--ca=" + c.CAFile, "--token=" + c.Token,
		fmt.Sprintf("--cluster-id=%d", c.ClusterID), "--cluster-name=" + c.ClusterName,
		fmt.Sprintf("--sets=%d", c.Sets), fmt.Sprintf("--space=%d", c.Space),
		fmt.Sprintf("--seed=%d", c.Seed), fmt.Sprintf("--watch=%v", c.Watch),
		fmt.Sprintf("--goroutines=%d", c.Goroutines),
	}
}

// workerResult is what a worker prints when done.
type workerResult struct {
	// IDs maps each set's Key to its identity.
	IDs map[string]identity.Identity `json:"ids"`
	// Wall is the time from the start signal until every set was allocated.
	Wall time.Duration `json:"wall"`
	// Requests counts API requests after the start signal by "METHOD kind".
	Requests map[string]int `json:"requests"`
	// Stats are the allocator's counters.
	Stats identity.AllocatorStats `json:"stats"`
	// CachedAtStart is the size of the cache at the start signal.
	CachedAtStart int `json:"cachedAtStart"`
}

// requestCounter counts the requests of one worker once started.
type requestCounter struct {
	mu     sync.Mutex
	active bool
	counts map[string]int
}

type countingTransport struct {
	rt http.RoundTripper
	c  *requestCounter
}

func (t countingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	kind := "other"
	switch {
	case req.URL.Query().Get("watch") == "true":
		kind = "watch"
	case strings.HasSuffix(req.URL.Path, "/meshidentities"):
		kind = "meshidentities"
	case strings.Contains(req.URL.Path, "/meshidentities/"):
		kind = "meshidentity"
	}
	t.c.mu.Lock()
	if t.c.active {
		t.c.counts[req.Method+" "+kind]++
	}
	t.c.mu.Unlock()
	return t.rt.RoundTrip(req)
}

// runWorker is the body of a worker process: connect as an agent would (its own client, and
// with --watch an informer feeding the allocator's cache), print "ready", wait for a line on
// stdin, allocate every set in a shuffled order with several goroutines, print the result as
// JSON.
func runWorker(args []string) int {
	var wc workerConfig
	fs := flag.NewFlagSet(workerSubcommand, flag.ContinueOnError)
	fs.StringVar(&wc.Server, "server", "", "API server URL")
	fs.StringVar(&wc.CAFile, "ca", "", "CA certificate file")
	fs.StringVar(&wc.Token, "token", "", "bearer token")
	clusterID := fs.Uint("cluster-id", 0, "cluster ID")
	fs.StringVar(&wc.ClusterName, "cluster-name", "", "cluster name")
	fs.IntVar(&wc.Sets, "sets", 0, "number of label sets")
	fs.IntVar(&wc.Space, "space", 0, "allocator space (0: all)")
	fs.Uint64Var(&wc.Seed, "seed", 0, "shuffle seed")
	fs.BoolVar(&wc.Watch, "watch", false, "feed the cache from an informer")
	fs.IntVar(&wc.Goroutines, "goroutines", 1, "concurrent allocations")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	wc.ClusterID = uint8(*clusterID)
	res, err := work(wc, os.Stdin, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		return 1
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		return 1
	}
	return 0
}

func work(wc workerConfig, stdin io.Reader, stdout io.Writer) (*workerResult, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	ca, err := os.ReadFile(wc.CAFile)
	if err != nil {
		return nil, err
	}
	counter := &requestCounter{counts: make(map[string]int)}
	cfg := &rest.Config{
		Host:            wc.Server,
		BearerToken:     wc.Token,
		TLSClientConfig: rest.TLSClientConfig{CAData: ca},
		// No client-side rate limit: measure the allocator and the server, not the limiter.
		QPS: -1,
	}
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper { return countingTransport{rt, counter} })
	c, err := newClient(cfg)
	if err != nil {
		return nil, err
	}
	a := identity.NewAllocator(NewStore(c), identity.AllocatorOptions{Cluster: wc.ClusterID, Space: wc.Space, Watched: wc.Watch})
	if wc.Watch {
		ic, err := cache.New(cfg, cache.Options{Scheme: newScheme()})
		if err != nil {
			return nil, err
		}
		inf, err := ic.GetInformer(ctx, &v1alpha1.MeshIdentity{})
		if err != nil {
			return nil, err
		}
		if _, err := inf.AddEventHandler(EventHandler(a, nil)); err != nil {
			return nil, err
		}
		go func() { _ = ic.Start(ctx) }()
		if !ic.WaitForCacheSync(ctx) {
			return nil, fmt.Errorf("informer did not sync")
		}
	} else if err := a.Sync(ctx); err != nil {
		return nil, err
	}
	sets := make([]identity.Labels, wc.Sets)
	for i := range sets {
		sets[i] = testSet(wc.ClusterName, i)
	}
	order := rand.New(rand.NewPCG(wc.Seed, 42)).Perm(len(sets))

	fmt.Fprintln(stdout, "ready")
	if _, err := bufio.NewReader(stdin).ReadString('\n'); err != nil {
		return nil, fmt.Errorf("wait for start: %w", err)
	}
	res := &workerResult{IDs: make(map[string]identity.Identity), CachedAtStart: len(a.Snapshot())}
	counter.mu.Lock()
	counter.active = true
	counter.mu.Unlock()
	start := time.Now()
	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := make(chan error, wc.Goroutines)
	for g := range wc.Goroutines {
		wg.Go(func() {
			for j := g; j < len(order); j += wc.Goroutines {
				l := sets[order[j]]
				id, err := a.Allocate(ctx, l)
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				res.IDs[l.Key()] = id
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	res.Wall = time.Since(start)
	close(errs)
	if err := <-errs; err != nil {
		return nil, err
	}
	counter.mu.Lock()
	counter.active = false
	res.Requests = counter.counts
	counter.mu.Unlock()
	res.Stats = a.Stats()
	return res, nil
}

// runWorkers runs one worker process per config at once (released together once all are
// ready) and returns their results.
func runWorkers(t *testing.T, cfgs []workerConfig) []workerResult {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	type proc struct {
		cmd    *exec.Cmd
		stdin  io.WriteCloser
		stdout *bufio.Reader
		stderr strings.Builder
	}
	procs := make([]*proc, len(cfgs))
	for i, wc := range cfgs {
		p := &proc{cmd: exec.CommandContext(t.Context(), exe, wc.args()...)}
		p.cmd.Stderr = &p.stderr
		if p.stdin, err = p.cmd.StdinPipe(); err != nil {
			t.Fatal(err)
		}
		out, err := p.cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		p.stdout = bufio.NewReader(out)
		if err := p.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = p.cmd.Wait() })
		procs[i] = p
	}
	for i, p := range procs {
		line, err := p.stdout.ReadString('\n')
		if err != nil || line != "ready\n" {
			t.Fatalf("worker %d: not ready: %q, %v; stderr:\n%s", i, line, err, p.stderr.String())
		}
	}
	for _, p := range procs {
		if _, err := io.WriteString(p.stdin, "go\n"); err != nil {
			t.Fatal(err)
		}
	}
	results := make([]workerResult, len(procs))
	for i, p := range procs {
		if err := json.NewDecoder(p.stdout).Decode(&results[i]); err != nil {
			_ = p.cmd.Wait()
			t.Fatalf("worker %d: result: %v; stderr:\n%s", i, err, p.stderr.String())
		}
		if err := p.cmd.Wait(); err != nil {
			t.Fatalf("worker %d: %v; stderr:\n%s", i, err, p.stderr.String())
		}
	}
	return results
}

// convergeCase is one run of several agent processes allocating the same sets.
type convergeCase struct {
	name       string
	clusterID  uint8
	workers    int
	sets       int
	space      int
	watch      bool
	goroutines int
}

func runConverge(t *testing.T, tc convergeCase) {
	cp := controlPlane(t)
	caFile := filepath.Join(t.TempDir(), "ca.crt")
	if err := os.WriteFile(caFile, cp.CACert(), 0o600); err != nil {
		t.Fatal(err)
	}
	clusterName := fmt.Sprintf("c%d", tc.clusterID)
	cfgs := make([]workerConfig, tc.workers)
	for i := range cfgs {
		cfgs[i] = workerConfig{
			Server: cp.URL(), CAFile: caFile, Token: cp.Token(agentUsers[i]),
			ClusterID: tc.clusterID, ClusterName: clusterName,
			Sets: tc.sets, Space: tc.space, Seed: uint64(i) + 1, Watch: tc.watch, Goroutines: tc.goroutines,
		}
	}
	start := time.Now()
	results := runWorkers(t, cfgs)
	total := time.Since(start)

	// Every worker gave every set the same number.
	for i, r := range results {
		if len(r.IDs) != tc.sets {
			t.Errorf("worker %d allocated %d sets, want %d", i, len(r.IDs), tc.sets)
		}
		if diff := cmp.Diff(results[0].IDs, r.IDs); diff != "" {
			t.Fatalf("worker %d disagrees with worker 0 (-0 +%d):\n%s", i, i, diff)
		}
	}
	// The API server holds exactly one MeshIdentity per set, the one the workers use.
	stored := listCluster(t, adminClient(t, cp), tc.clusterID)
	byKey := make(map[string]identity.Identity)
	for id, l := range stored {
		if prev, dup := byKey[l.Key()]; dup {
			t.Errorf("set %s has identities %s and %s", l.Key(), prev, id)
		}
		byKey[l.Key()] = id
	}
	if diff := cmp.Diff(results[0].IDs, byKey); diff != "" {
		t.Errorf("API server vs workers (-workers +server):\n%s", diff)
	}
	if len(stored) != tc.sets {
		t.Errorf("%d MeshIdentities in cluster %d, want %d", len(stored), tc.clusterID, tc.sets)
	}
	// And each is where the probe sequence puts it.
	check := identity.NewAllocator(identitytest.NewStore(), identity.AllocatorOptions{Cluster: tc.clusterID, Space: tc.space})
	if err := identitytest.CheckConsistent(check, stored); err != nil {
		t.Error(err)
	}
	firstChoice := 0
	for id, l := range stored {
		if id == check.Probe(l, 0) {
			firstChoice++
		}
	}

	// Figures.
	sum := make(map[string]int)
	var walls []time.Duration
	var st identity.AllocatorStats
	for i, r := range results {
		calls := 0
		for k, v := range r.Requests {
			sum[k] += v
			calls += v
		}
		walls = append(walls, r.Wall)
		st.Gets += r.Stats.Gets
		st.Creates += r.Stats.Creates
		st.Collisions += r.Stats.Collisions
		st.CacheHits += r.Stats.CacheHits
		st.Skips += r.Stats.Skips
		t.Logf("worker %d: %v, %d API calls %v, cache at start %d, stats %+v", i, r.Wall.Round(time.Millisecond), calls, r.Requests, r.CachedAtStart, r.Stats)
	}
	calls := 0
	for _, v := range sum {
		calls += v
	}
	t.Logf("%s: %d workers x %d sets (space %d, watch %v, %d goroutines each): slowest worker %v, total incl. process start %v; "+
		"%d API calls in all %v (%.2f per allocation); allocator gets %d, creates %d, collisions %d, cache hits %d, skips %d; %d/%d sets at their first choice",
		tc.name, tc.workers, tc.sets, tc.space, tc.watch, tc.goroutines, slices.Max(walls).Round(time.Millisecond), total.Round(time.Millisecond),
		calls, sum, float64(calls)/float64(tc.workers*tc.sets), st.Gets, st.Creates, st.Collisions, st.CacheHits, st.Skips, firstChoice, len(stored))
}

// TestConvergeAcrossProcesses: five agent processes, each with its own client and identity
// (an RBAC user holding only the identity verbs), allocate the same 500 label sets at once in
// different orders, and end with one MeshIdentity per set and the same numbers everywhere.
func TestConvergeAcrossProcesses(t *testing.T) {
	for _, tc := range []convergeCase{
		{name: "watch-fed cache", clusterID: 1, workers: 5, sets: 500, watch: true, goroutines: 4},
		{name: "no watch", clusterID: 2, workers: 5, sets: 500, watch: false, goroutines: 4},
	} {
		t.Run(tc.name, func(t *testing.T) { runConverge(t, tc) })
	}
}

// TestConvergeWithCollisions squeezes the sets into a tiny space, so most walks collide and
// probe; the workers must still agree, and every identity must sit at the first probe of its
// set not held by another set.
func TestConvergeWithCollisions(t *testing.T) {
	for _, tc := range []convergeCase{
		{name: "500 sets in 600 numbers", clusterID: 3, workers: 5, sets: 500, space: 600, watch: true, goroutines: 4},
		{name: "60 sets in 64 numbers, no watch", clusterID: 4, workers: 5, sets: 60, space: 64, watch: false, goroutines: 4},
		{name: "64 sets in 64 numbers, one goroutine each", clusterID: 5, workers: 5, sets: 64, space: 64, watch: false, goroutines: 1},
	} {
		t.Run(tc.name, func(t *testing.T) { runConverge(t, tc) })
	}
}
