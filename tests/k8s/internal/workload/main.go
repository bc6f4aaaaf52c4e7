// Command workload is the test pods' program in tests/k8s: a TCP echo server, a UDP echo
// server and an HTTP server whose /dial endpoint makes the pod itself the client of a TCP
// exchange with another address, so that traffic between two pods leaves from a pod the
// kubelet made, through the pod's own network namespace and interface.
//
//	GET /healthz                          -> 200 "ok"
//	GET /dial?addr=IP:PORT&hex=PAYLOAD    -> connects to addr over TCP, sends the decoded
//	                                         payload, reads as many bytes back and answers
//	                                         them hex-encoded (502 with the error otherwise)
//
// Payloads travel hex-encoded in the HTTP request and response, so the test's request to the
// pod never carries the payload's bytes themselves.
package main

import (
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	tcpAddr := flag.String("tcp", ":7000", "TCP echo listen address")
	udpAddr := flag.String("udp", ":7001", "UDP echo listen address")
	httpAddr := flag.String("http", ":8080", "HTTP listen address")
	flag.Parse()

	ln, err := net.Listen("tcp", *tcpAddr)
	if err != nil {
		log.Fatalf("listen tcp: %v", err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				log.Fatalf("accept: %v", err)
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(time.Minute))
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	uc, err := net.ListenPacket("udp", *udpAddr)
	if err != nil {
		log.Fatalf("listen udp: %v", err)
	}
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := uc.ReadFrom(buf)
			if err != nil {
				log.Fatalf("read udp: %v", err)
			}
			_, _ = uc.WriteTo(buf[:n], from)
		}
	}()
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, "ok") })
	mux.HandleFunc("/dial", dial)
	srv := &http.Server{Addr: *httpAddr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
		<-sigs
		os.Exit(0)
	}()
	log.Fatal(srv.ListenAndServe())
}

// dial is the /dial handler: one TCP request/response with the address given.
func dial(w http.ResponseWriter, r *http.Request) {
	addr := r.URL.Query().Get("addr")
	payload, err := hex.DecodeString(r.URL.Query().Get("hex"))
	if err != nil || len(payload) == 0 {
		http.Error(w, "want hex=PAYLOAD", http.StatusBadRequest)
		return
	}
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		http.Error(w, fmt.Sprintf("dial %s: %v", addr, err), http.StatusBadGateway)
		return
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(payload); err != nil {
		http.Error(w, fmt.Sprintf("write to %s: %v", addr, err), http.StatusBadGateway)
		return
	}
	back := make([]byte, len(payload))
	if _, err := io.ReadFull(c, back); err != nil {
		http.Error(w, fmt.Sprintf("read from %s: %v", addr, err), http.StatusBadGateway)
		return
	}
	fmt.Fprint(w, hex.EncodeToString(back))
}
