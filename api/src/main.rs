fn main() {
    println!("api: not built yet");
}
