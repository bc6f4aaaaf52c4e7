package metrics

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// DefaultPort is the agent's metrics and health port. The agent runs in the host's network
// namespace, so the port is taken on every node.
const DefaultPort = 9962

// Paths the Server serves.
const (
	PathMetrics = "/metrics"
	PathHealthz = "/healthz"
	PathReadyz  = "/readyz"
)

// Timeouts of the Server.
const (
	readHeaderTimeout = 5 * time.Second
	writeTimeout      = 30 * time.Second
	shutdownTimeout   = 5 * time.Second
)

// ServerOptions configure a Server.
type ServerOptions struct {
	// Addr is the listen address of Run, e.g. ":9962".
	Addr string
	// Gatherer is what /metrics serves, normally Recorder.Gatherer(). Required.
	Gatherer prometheus.Gatherer
	// Ready reports whether the agent is ready (informers synced, first reconcile done):
	// nil for ready, else why not. /readyz calls it on every request, so it must be cheap
	// and safe for concurrent use. Nil means ready as soon as the server serves.
	Ready func() error
	// Handlers are further routes, by http.ServeMux pattern (the agent's "GET /flows"). A
	// handler that streams must lift the server's write timeout itself
	// (http.ResponseController.SetWriteDeadline).
	Handlers map[string]http.Handler
	// Logger receives the server's errors; nil discards them.
	Logger *slog.Logger
}

// Server serves /metrics, /healthz, /readyz and ServerOptions.Handlers. Create it with NewServer and start it with Run
// or Serve.
type Server struct {
	opts ServerOptions
	log  *slog.Logger
	mux  *http.ServeMux
}

// NewServer checks opts and returns a Server. It does no I/O.
func NewServer(opts ServerOptions) (*Server, error) {
	if opts.Gatherer == nil {
		return nil, errors.New("metrics server: a Gatherer is required")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{opts: opts, log: log, mux: http.NewServeMux()}
	s.mux.Handle("GET "+PathMetrics, promhttp.HandlerFor(opts.Gatherer, promhttp.HandlerOpts{
		ErrorLog:      errorLog{log},
		ErrorHandling: promhttp.ContinueOnError,
		Timeout:       writeTimeout - time.Second,
	}))
	s.mux.HandleFunc("GET "+PathHealthz, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, "ok\n")
	})
	s.mux.HandleFunc("GET "+PathReadyz, s.readyz)
	for pattern, h := range opts.Handlers {
		s.mux.Handle(pattern, h)
	}
	return s, nil
}

// Handler returns the server's handler, for embedding it elsewhere or testing it directly.
func (s *Server) Handler() http.Handler { return s.mux }

func (s *Server) readyz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if s.opts.Ready != nil {
		if err := s.opts.Ready(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "not ready: %v\n", err)
			return
		}
	}
	io.WriteString(w, "ok\n")
}

// Run listens on Addr and serves until ctx ends, then shuts down gracefully. It returns nil
// after a shutdown caused by ctx, else the listen or serve error.
func (s *Server) Run(ctx context.Context) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", s.opts.Addr)
	if err != nil {
		return fmt.Errorf("metrics server: listen on %s: %w", s.opts.Addr, err)
	}
	return s.Serve(ctx, ln)
}

// Serve serves on ln (which it closes) until ctx ends, like Run.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           s.mux,
		ReadHeaderTimeout: readHeaderTimeout,
		WriteTimeout:      writeTimeout,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	s.log.Info("metrics server listening", "addr", ln.Addr().String())
	select {
	case err := <-errc:
		return fmt.Errorf("metrics server: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		return fmt.Errorf("metrics server: shut down: %w", err)
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("metrics server: %w", err)
	}
	return nil
}

// errorLog adapts slog to promhttp's error logger.
type errorLog struct{ log *slog.Logger }

func (l errorLog) Println(v ...any) { l.log.Warn("metrics: " + fmt.Sprint(v...)) }
