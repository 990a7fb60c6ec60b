// vcsim: govmomi's vCenter simulator (simulator.VPX) on loopback, for lifeboat's vmware tests.
//
// Built by tests/targets/vcsim.py with Debian's golang-go and golang-github-vmware-govmomi-dev
// (GO111MODULE=off GOPATH=/usr/share/gocode go build), cached by this file's content hash.
// Only -user with -password logs in. -cbt (the default) adds changed-block tracking (cbt.go). With -cert and -key it serves https with that certificate (else plain http). It prints one
// JSON line {"url"} once it listens, and runs until its standard input
// closes or it gets SIGTERM/SIGINT, then removes the model's temporary datastores.
package main

import (
	"crypto/tls"
	"encoding/json"
	"flag"
	"io"
	"io/ioutil"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "host:port to listen on")
	certFile := flag.String("cert", "", "server certificate (PEM): serve https")
	keyFile := flag.String("key", "", "its private key (PEM)")
	user := flag.String("user", "user", "the only user name that logs in")
	password := flag.String("password", "pass", "its password")
	withCBT := flag.Bool("cbt", true, "add changed-block tracking (cbt.go)")
	flag.Parse()
	log.SetOutput(ioutil.Discard) // the simulator logs every call

	model := simulator.VPX()
	if err := model.Create(); err != nil {
		os.Stderr.WriteString("vcsim: " + err.Error() + "\n")
		os.Exit(1)
	}
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *password)}
	model.Service.TLS = nil
	if *certFile != "" {
		pair, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			os.Stderr.WriteString("vcsim: " + err.Error() + "\n")
			os.Exit(1)
		}
		model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{pair}}
	}
	var tracker *cbt
	if *withCBT {
		dir, err := ioutil.TempDir("", "vcsim-cbt-")
		if err != nil {
			os.Stderr.WriteString("vcsim: " + err.Error() + "\n")
			os.Exit(1)
		}
		defer os.RemoveAll(dir)
		tracker = &cbt{dir: dir}
		simulator.Map.AddHandler(tracker)
	}
	server := model.Service.NewServer()
	if tracker != nil {
		// read per request by net/http, so replacing it before the first client is safe
		server.Config.Handler = tracker.serve(server.Config.Handler)
	}
	u := *server.URL
	u.User = nil
	line, _ := json.Marshal(map[string]string{"url": u.String()})
	os.Stdout.Write(append(line, '\n'))

	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(ioutil.Discard, os.Stdin); done <- struct{}{} }()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() { <-sig; done <- struct{}{} }()
	<-done
	server.Close()
	model.Remove()
}
