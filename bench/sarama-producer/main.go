// sarama-producer: produce records with Sarama, the Go client many chat backends use,
// partitioned by its default hash partitioner (FNV-1a), as those services do.
//
// Reads lines "key<TAB>value" from stdin and sends each to -topic, keyed by key.
// Prints "produced N records" and exits 0 once every record is acknowledged.
// Used by crates/cli/tests/json_events.rs (READSTATE_SARAMA_PRODUCER).
package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/IBM/sarama"
)

func main() {
	brokers := flag.String("brokers", "127.0.0.1:9092", "bootstrap servers, comma-separated")
	topic := flag.String("topic", "", "topic to produce to")
	flag.Parse()
	if *topic == "" {
		fmt.Fprintln(os.Stderr, "sarama-producer: -topic is required")
		os.Exit(2)
	}
	config := sarama.NewConfig()
	config.Producer.Partitioner = sarama.NewHashPartitioner
	config.Producer.RequiredAcks = sarama.WaitForAll
	config.Producer.Return.Successes = true
	config.Producer.Return.Errors = true
	producer, err := sarama.NewAsyncProducer(strings.Split(*brokers, ","), config)
	if err != nil {
		fmt.Fprintf(os.Stderr, "sarama-producer: connecting to %s: %v\n", *brokers, err)
		os.Exit(1)
	}
	sent := 0
	// Every acknowledgement and every error is read here until AsyncClose closes both
	// channels (Close would drain them itself, racing these counts). `pending` counts the
	// records not yet acknowledged or failed: the producer is closed only once it is zero,
	// because Sarama fails a record whose retry (after a transient broker error) comes
	// after AsyncClose with "producer in process of shutting down".
	var pending sync.WaitGroup
	acks := make(chan int)
	errs := make(chan []error)
	go func() {
		acked := 0
		for range producer.Successes() {
			acked++
			pending.Done()
		}
		acks <- acked
	}()
	go func() {
		var failed []error
		for e := range producer.Errors() {
			failed = append(failed, e.Err)
			pending.Done()
		}
		errs <- failed
	}()
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), 1<<20)
	for scanner.Scan() {
		key, value, ok := strings.Cut(scanner.Text(), "\t")
		if !ok {
			fmt.Fprintf(os.Stderr, "sarama-producer: line %d has no tab\n", sent+1)
			os.Exit(2)
		}
		pending.Add(1)
		producer.Input() <- &sarama.ProducerMessage{
			Topic: *topic,
			Key:   sarama.StringEncoder(key),
			Value: sarama.StringEncoder(value),
		}
		sent++
	}
	settled := make(chan struct{})
	go func() {
		pending.Wait()
		close(settled)
	}()
	select {
	case <-settled:
	case <-time.After(2 * time.Minute):
		fmt.Fprintln(os.Stderr, "sarama-producer: records still unacknowledged after 2 minutes; closing")
	}
	producer.AsyncClose()
	acked, failed := <-acks, <-errs
	if len(failed) > 0 {
		fmt.Fprintf(os.Stderr, "sarama-producer: %d records failed, the first: %v\n", len(failed), failed[0])
		os.Exit(1)
	}
	if acked != sent {
		fmt.Fprintf(os.Stderr, "sarama-producer: %d of %d records acknowledged\n", acked, sent)
		os.Exit(1)
	}
	fmt.Printf("produced %d records\n", sent)
}
