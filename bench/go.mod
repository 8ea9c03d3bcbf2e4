module example.com/gopulse/bench

go 1.21
